"""The repository's deploy files, and those `plan --emit` writes, are ones Ray's launcher, Serve and KubeRay accept."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema
from typer.testing import CliRunner

from cluster.cli import app
from cluster.placement_options import resolve_expert_map
from cluster.planning.hardware import CPU_NODE, GPUS, HEAD
from cluster.serve.args import ServeArgs
from router.expert_map import ExpertMap

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve_config.yaml"


def test_the_serve_config_passes_serves_schema_and_its_args_pass_serve_args() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)
    [application] = schema.applications
    assert application.import_path == "cluster.serve.app:app_builder"
    args = ServeArgs.model_validate(application.args)
    assert args.checkpoint == "tiny" and args.api_key is None
    assert "grpc_options" not in config  # gRPC listens on every interface: off unless a key is set


EMITTED = Path(__file__).resolve().parents[1] / "deploy" / "mixtral-8x7b-l4"
MIXTRAL_L4 = [
    "--gpu",
    "L4",
    "--requests-per-s",
    "4",
    "--interconnect",
    "ethernet-25g",
]  # deploy/mixtral-8x7b-l4: its replicas span nodes


def emit(tmp_path: Path, *options: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """`moe-cluster plan --emit`: the expert-parallel plan (its --json) and the three files, parsed."""
    result = CliRunner().invoke(app, ["plan", *options, "--json", "--emit", str(tmp_path)])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.strip().splitlines()[-1])["plans"][0]
    return plan, {name: yaml.safe_load((tmp_path / name).read_text()) for name in FILES}


FILES = ("serve_config.yaml", "cluster.yaml", "rayservice.yaml", "expert_map.json")


def test_plan_emit_writes_files_that_pass_rays_schemas_with_the_plans_gpus(tmp_path: Path) -> None:
    plan, files = emit(tmp_path, *MIXTRAL_L4)
    assert plan["fits"] and plan["replicas"] == 2 and plan["gpus_per_replica"] == 9

    serve_config = ServeDeploySchema.model_validate(files["serve_config.yaml"])
    args = ServeArgs.model_validate(serve_config.applications[0].args)
    assert args.accelerator == "gpu" and args.api_key_env and args.api_key is None  # no secret in the file
    assert (args.min_replicas, args.max_replicas, args.max_num_seqs) == (plan["replicas"], 2 * plan["replicas"], plan["batch"])
    assert args.kv_cache_memory == pytest.approx(plan["kv_cache_memory"], abs=1e-4)

    launcher = files["cluster.yaml"]
    validate_config(prepare_config(copy.deepcopy(launcher)))
    gpu_nodes = launcher["available_node_types"]["gpu_workers"]
    per_node = gpu_nodes["resources"]["GPU"]
    used = plan["replicas"] * plan["gpus_per_replica"]
    assert_nodes_hold(gpu_nodes["min_workers"], per_node, used)
    assert_nodes_hold(gpu_nodes["max_workers"], per_node, 2 * used)
    # Priced as launched: every GPU of the nodes the files start (20 L4s for 2 x 9), and the head node.
    assert (plan["nodes"], plan["gpus"]) == (gpu_nodes["min_workers"], gpu_nodes["min_workers"] * per_node) == (5, 20)
    assert gpu_nodes["node_config"]["InstanceType"] == plan["node_type"] == "g6.12xlarge"
    head = launcher["available_node_types"]["head"]["node_config"]["InstanceType"]
    assert head == HEAD.name and plan["usd_per_hour"] == pytest.approx(20 * GPUS["L4"].price_per_hour + HEAD.price_per_hour)

    service = files["rayservice.yaml"]
    assert service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert ServeDeploySchema.model_validate(embedded) == serve_config
    [group] = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == str(per_node)
    assert (group["minReplicas"], group["maxReplicas"]) == (gpu_nodes["min_workers"], gpu_nodes["max_workers"])


def assert_nodes_hold(nodes: int, gpus_per_node: int, gpus: int) -> None:
    """Enough nodes for `gpus`, and not one more than that takes."""
    assert nodes * gpus_per_node >= gpus > (nodes - 1) * gpus_per_node


def test_the_repositorys_deploy_files_are_as_emitted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(EMITTED.parents[1])  # the launcher's steps name the directory from the repository's root
    emit(tmp_path / "again", *MIXTRAL_L4)
    for name in FILES:
        again = (tmp_path / "again" / name).read_text().replace(str(tmp_path / "again"), "deploy/mixtral-8x7b-l4")
        assert yaml.safe_load(again) == yaml.safe_load((EMITTED / name).read_text()), name


@pytest.mark.parametrize(
    "options, message",
    [
        (["--gpu", "RTX4090"], "no cloud node type is known for RTX4090"),
        (["--gpu", "L4", "--dtype", "float32"], "an expert (22.5 GB) is larger than one L4's room"),
        (["--gpu", "L4", "--requests-per-s", "4", "--max-replicas", "1"], "below the 2 replicas the plan needs"),
        (["--gpu", "L4", "--cpu-experts", "8"], "--cpu-experts must be from 0 to 7"),
        (["--gpu", "L4", "--dtype", "float32", "--replicate-hot", "2"], "copies and CPU experts need it whole"),
        (["--gpu", "L4", "--max-experts-per-gpu", "0"], "--max-experts-per-gpu: must be at least 1"),
        (["--gpu", "L4", "--model", "mistral-7b"], "deploy files of an expert-parallel (MoE) plan"),
    ],
)
def test_plan_emit_refuses_what_it_cannot_deploy_in_one_line(tmp_path: Path, options: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["plan", *options, "--emit", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not any(tmp_path.iterdir())


def test_the_planner_counts_int8_hot_copies_and_cpu_workers_and_emits_their_map(tmp_path: Path) -> None:
    base, _ = emit(tmp_path / "base", "--gpu", "L4", "--skew", "1.5")
    int8, files = emit(tmp_path / "int8", "--gpu", "L4", "--skew", "1.5", "--expert-dtype", "int8")
    # An int8 expert is half a bf16 one: three fit an L4 where one did, so a replica needs 1 + 3 GPUs, not 1 + 8.
    assert int8["memory_gb"]["expert"]["expert_weights"] == pytest.approx(
        3 * base["memory_gb"]["expert"]["expert_weights"] / 2, rel=1e-3
    )
    assert (base["gpus_per_replica"], int8["gpus_per_replica"]) == (9, 4)
    args = ServeArgs.model_validate(ServeDeploySchema.model_validate(files["serve_config.yaml"]).applications[0].args)
    assert args.expert_dtype == "int8"
    served = resolve_expert_map(8, map_path=args.expert_map)  # the runtime takes the inline map
    assert served == ExpertMap.read(tmp_path / "int8" / "expert_map.json", num_experts=8)
    assert served is not None and served.workers == ((0, 1, 2), (3, 4, 5), (6, 7)) and set(served.kinds) == {"gpu"}

    # A spare copy in the slot an A100-40GB has free (three experts a GPU, 3 + 3 + 2) takes the hot experts'
    # excess off the busiest GPU: a shorter step at the same batch, on as many GPUs.
    hot, _ = emit(tmp_path / "hot", "--gpu", "A100-40GB", "--skew", "1.5", "--tpot-ms", "1000", "--replicate-hot", "1")
    plain, _ = emit(tmp_path / "plain", "--gpu", "A100-40GB", "--skew", "1.5", "--tpot-ms", "1000")
    assert hot["batch"] == plain["batch"] and hot["tpot_ms"] < plain["tpot_ms"]
    assert hot["gpus_per_replica"] == plain["gpus_per_replica"] == 4
    assert sum(len(w["experts"]) for w in hot["expert_map"]["workers"]) == 9

    # A CPU worker's node is paid for, and the map says which experts it holds.
    cpu, files = emit(tmp_path / "cpu", "--gpu", "A100-80GB", "--max-experts-per-gpu", "2", "--cpu-experts", "2")
    assert cpu["cpu_workers"] == 1 and cpu["gpus_per_replica"] == 4
    launched = math.ceil(cpu["replicas"] * 4 / 8) * 8  # whole 8-GPU p4de nodes
    assert cpu["usd_per_hour"] == pytest.approx(
        launched * GPUS["A100-80GB"].price_per_hour + cpu["replicas"] * CPU_NODE.price_per_hour + HEAD.price_per_hour
    )
    assert [(w["experts"], w["kind"]) for w in cpu["expert_map"]["workers"]][-1] == ([6, 7], "cpu")
    assert files["cluster.yaml"]["available_node_types"]["gpu_workers"]["resources"]["GPU"] == 8


def test_the_docs_two_model_config_is_a_serve_application_whose_models_get_their_own_settings() -> None:
    from cluster.serve.args import ServeArgs

    docs = (Path(__file__).resolve().parent.parent / "docs" / "serving.md").read_text()
    [example] = [block for block in docs.split("```yaml\n")[1:] if "models:" in block.split("```")[0]]
    args = yaml.safe_load(example.split("```")[0])["args"]
    application = {"name": "moe", "route_prefix": "/", "import_path": "cluster.serve.app:app_builder", "args": args}
    ServeDeploySchema.model_validate({"applications": [application]})  # as `serve deploy` reads it
    mixtral, mistral = ServeArgs.model_validate(args).per_model()
    assert (mixtral.names, mixtral.min_replicas, mixtral.max_replicas, mixtral.autoscaling) == (["mixtral"], 2, 6, True)
    assert (mistral.names, mistral.max_num_seqs, mistral.api_key_env) == (["mistral"], 128, None)  # the key is the endpoint's
    assert ServeArgs.model_validate(args).api_key_env == "MOE_API_KEY"


def test_a_t4_plan_in_float16_emits_a_float16_server(tmp_path: Path) -> None:
    """A T4 has no bf16: planned in float16, its server must compute in float16, not in the checkpoint's bf16."""
    plan, files = emit(tmp_path, "--gpu", "T4", "--dtype", "float16")
    assert plan["dtype"] == plan["expert_dtype"] == "float16"
    args = ServeArgs.model_validate(ServeDeploySchema.model_validate(files["serve_config.yaml"]).applications[0].args)
    assert args.dtype == "float16"
