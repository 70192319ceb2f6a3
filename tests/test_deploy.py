"""The repository's deploy files, and those `plan --emit` writes, are ones Ray's launcher, Serve and KubeRay accept."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema
from typer.testing import CliRunner

from cluster.cli import app
from cluster.serve.args import ServeArgs

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


FILES = ("serve_config.yaml", "cluster.yaml", "rayservice.yaml")


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
    assert_nodes_hold(gpu_nodes["min_workers"], per_node, plan["gpus"])
    assert_nodes_hold(gpu_nodes["max_workers"], per_node, 2 * plan["gpus"])

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
        (["--gpu", "L4", "--dtype", "float32"], "splits each expert over 2 GPUs"),
        (["--gpu", "L4", "--requests-per-s", "4", "--max-replicas", "1"], "below the 2 replicas the plan needs"),
    ],
)
def test_plan_emit_refuses_what_it_cannot_deploy_in_one_line(tmp_path: Path, options: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["plan", *options, "--emit", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not any(tmp_path.iterdir())
