"""The planner's tiers as the runtime holds them, and priced at a server's measured usage (`plan --usage`).

The dense tier's weights and KV bytes are what a dense Mistral checkpoint holds on disk and what the
engine holds in memory; a saved GET /v1/engine/stats prices each tier at each served model's monthly
output volume with the same arithmetic as the plan's fixed volumes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from cluster.planning.cost_model import ModelCost, kv_spec, model_params, non_expert_params
from cluster.planning.hardware import GPUS, HEAD, INSTANCES, INTERCONNECTS
from cluster.planning.planner import HOURS_PER_MONTH, Workload, model_args, plan_tier
from mixtral.kv_spec import KVSpec
from tests.conftest import SMALL
from tests.test_cli import assert_one_line_error, run_cli_here

SMALL_DENSE = SMALL  # the suite's small shape, written as a dense Mistral
WORKLOAD = Workload(requests_per_s=1, prompt_len=512, output_len=256, ttft_ms=2000, tpot_ms=100)


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def dense_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mixtral.synthetic import make_checkpoint

    return make_checkpoint(
        tmp_path_factory.mktemp("dense") / "model",
        preset_name="mistral-tiny",
        overrides=SMALL_DENSE | dict(tie_word_embeddings=request.param),
        tokenizer=False,
        max_shard_size="300KB",
    )


def checkpoint_bytes(path: Path) -> int:
    """Every tensor in the checkpoint's safetensors files, at 4 bytes an element (float32)."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                assert tensor.get_dtype() == "F32"
                total += math.prod(tensor.get_shape()) * 4
    return total


def test_the_dense_tier_counts_the_weights_and_kv_the_checkpoint_and_the_engine_hold(dense_checkpoint: Path) -> None:
    from cluster.engine.build import local_engine
    from mixtral.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(dense_checkpoint)
    args = checkpoint.args
    assert not args.is_moe and (args.num_local_experts, args.num_experts_per_tok) == (1, 1)
    assert ModelCost.of(args).gate_params == 0  # no router
    planned = model_params(args) * 4
    assert len(list(dense_checkpoint.glob("*.safetensors"))) > 1  # sharded: every shard counted
    assert planned == checkpoint_bytes(dense_checkpoint)

    # One coordinator thread: matrices held as the checkpoint's (q, k and v stacked), as on a GPU (a CPU with oneDNN on
    # several threads holds float32 matrices packed, a tied lm_head then as a second copy).
    engine = local_engine(checkpoint, coordinator_threads=1)
    model = engine.model
    tensors = [model.embed, model.final_norm, model.lm_head]
    for layer in model.layers:
        tensors += [layer.input_norm, layer.post_attention_norm, layer.attn.wqkv, layer.attn.wo]
    for gate, up, down in model.feed_forward.layers:  # DenseMLP
        tensors += [gate, up, down]
    assert (model.lm_head.data_ptr() == model.embed.data_ptr()) == args.tie_word_embeddings
    held = {t.data_ptr(): t.nbytes for t in tensors}  # a tied lm_head is the embeddings' own tensor: counted once
    assert len(held) == len(tensors) - args.tie_word_embeddings
    assert planned == sum(held.values())

    cache = model.cache
    spec = kv_spec(args, 4)
    assert spec == cache.spec == KVSpec.of(args, "float32")
    assert spec.bytes_per_token == cache.spec.bytes_per_token and spec.bytes_per_block == cache.spec.bytes_per_block
    assert cache.nbytes == spec.pool_bytes(cache.num_blocks)


def test_a_dense_checkpoint_config_plans_as_one_dense_gpu(dense_checkpoint: Path) -> None:
    args = model_args(json.loads((dense_checkpoint / "config.json").read_text()))
    assert args.model_type == "mistral" and not args.is_moe
    tier = plan_tier("small dense", args, GPUS["L4"], None, WORKLOAD, bytes_per_param=4, skew=1.0)
    assert tier.fits and tier.reason == "fits"
    assert tier.gpus_per_replica == 1 and tier.expert_map is None and tier.cpu_workers == 0
    assert list(tier.memory_gb) == ["gpu"]
    gpu = tier.memory_gb["gpu"]
    assert gpu["total"] == GPUS["L4"].memory_gb and gpu["expert_weights"] == 0
    assert gpu["attention_weights"] == round(model_params(args) * 4 / 1e9, 2)
    assert gpu["kv_cache"] == round(kv_spec(args, 4).pool_bytes(tier.kv_blocks) / 1e9, 2)


def test_the_dense_tier_is_mistral_7b_as_published() -> None:
    args = model_args("mistral-7b")
    assert (args.model_type, args.sliding_window, args.rope_theta, args.tie_word_embeddings) == ("mistral", 4096, 1e4, False)
    assert model_params(args) == 7_241_732_096  # MistralForCausalLM v0.1's parameters
    assert kv_spec(args, 2).bytes_per_token == 128 * 1024
    # Mixtral 8x7B: its routers counted, the lm_head untied, as in MixtralForCausalLM's 46.7B.
    mixtral = model_args("mixtral-8x7b")
    assert model_params(mixtral) == 46_702_792_704
    assert ModelCost.of(mixtral).gate_params == 4096 * 8
    tied = model_args({"model_type": "mistral", **SMALL_DENSE, "tie_word_embeddings": True})
    untied = model_args({"model_type": "mistral", **SMALL_DENSE})
    assert non_expert_params(untied) - non_expert_params(tied) == 512 * 64  # the lm_head, held once when tied


# --- plan --usage -----------------------------------------------------------------------------------

WINDOW_S = 7200.0
# 1500 output tokens/s is several replicas of either tier on an L4; 10/s is under one.
MEASURED = {"moe-small": int(1500 * WINDOW_S), "dense-small": int(10 * WINDOW_S)}


def stats_answer(window_s: Any = WINDOW_S, models: Any = None) -> dict[str, Any]:
    """A GET /v1/engine/stats answer as the server gives it (the usage part as UsageBook.report builds it)."""
    default = {m: {"requests": 7, "prompt_tokens": 99, "completion_tokens": c} for m, c in MEASURED.items()}
    counts = models if models is not None else default
    usage = {"window_s": window_s, "models": counts, "users": {"top": [], "others": {}, "tracked": 0}}
    return {"model": "moe-small", "moe": True, "running": 0, "waiting": 0, "usage": usage}


def write(tmp_path: Path, content: Any, name: str = "stats.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_plan_usage_prices_each_tier_at_each_models_measured_volume(cli_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from cluster.serve.usage import UsageBook

    answer = stats_answer()
    proc = run_cli_here("plan", "--usage", str(write(tmp_path, answer)), "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    volumes = {m: c / WINDOW_S * HOURS_PER_MONTH * 3600 for m, c in MEASURED.items()}
    assert out["usage"]["volumes"] == volumes == UsageBook.monthly_volumes(answer["usage"])  # the server's own figure
    assert out["usage"]["window_s"] == WINDOW_S and out["usage"]["hours_per_month"] == HOURS_PER_MONTH

    moe, dense = out["plans"]
    assert moe["tier"] == "mixtral-8x7b (expert parallel)" and dense["tier"] == "mistral-7b (dense)"
    for tier in (moe, dense):
        rows = {row["model"]: row for row in tier["usage_monthly"]}
        assert list(rows) == list(MEASURED)
        per_node = INSTANCES["L4"].gpus  # priced as launched: whole g6.12xlarge nodes, and the head
        for model, tokens in volumes.items():
            replicas = max(1, math.ceil(tokens / (HOURS_PER_MONTH * 3600) / tier["replica_tok_s"]))
            nodes = math.ceil(replicas * tier["gpus_per_replica"] / per_node)
            row = rows[model]
            assert (row["tokens"], row["replicas"], row["nodes"], row["gpus"]) == (tokens, replicas, nodes, nodes * per_node)
            usd_per_hour = nodes * per_node * GPUS["L4"].price_per_hour + (HEAD.price_per_hour or 0.0)
            assert row["usd"] == pytest.approx(usd_per_hour * HOURS_PER_MONTH)
            assert row["usd_per_million"] == pytest.approx(row["usd"] / (tokens / 1e6))
        assert rows["moe-small"]["replicas"] > 1  # more than one replica: the volume matters
        assert rows["dense-small"]["replicas"] == 1

    text = proc.stdout
    assert "per month at the measured usage" in text and f"over {WINDOW_S / 3600:.2f} h" in text
    for model, tokens in volumes.items():
        line = next(line for line in text.splitlines() if line.startswith(f"  {model}: "))
        assert f"{tokens / 1e6:,.1f}M tokens" in line
        for tier in (moe, dense):
            row = next(r for r in tier["usage_monthly"] if r["model"] == model)
            assert f"{tier['tier']} {row['gpus']} GPUs ${row['usd']:,.0f}" in line


def test_a_measured_volume_is_priced_as_the_plans_own_monthly_rows(cli_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A month-long window with 10M and 100M output tokens: the rows of the plan's fixed volumes.
    month = HOURS_PER_MONTH * 3600
    usage = stats_answer(month, {"a": {"completion_tokens": 10_000_000}, "b": {"completion_tokens": 100_000_000}})["usage"]
    proc = run_cli_here("plan", "--usage", str(write(tmp_path, usage)), "--json", env=cli_env)  # the usage object alone
    assert proc.returncode == 0, proc.stderr
    for tier in last_json(proc.stdout)["plans"]:
        fixed = {row["tokens"]: row for row in tier["monthly"]}
        for row in tier["usage_monthly"]:
            same = fixed[{"a": 10_000_000, "b": 100_000_000}[row["model"]]]
            assert row["tokens"] == pytest.approx(same["tokens"])
            assert (row["gpus"], row["usd"]) == (same["gpus"], same["usd"])


def test_plan_usage_reads_stats_json_output_too(cli_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # `moe-cluster stats --json` prints the engine's stats under "engine".
    proc = run_cli_here("plan", "--usage", str(write(tmp_path, {"engine": stats_answer()})), "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout)["usage"]["volumes"]["moe-small"] == MEASURED["moe-small"] / WINDOW_S * HOURS_PER_MONTH * 3600


@pytest.mark.parametrize(
    "content,fragments",
    [
        (None, ["does not exist"]),
        ("{not json", ["is not JSON"]),
        ({"model": "x", "running": 0}, ["has no usage report"]),
        ([1, 2], ["has no usage report"]),
        ({"usage": {"models": {"m": {"completion_tokens": 1}}}}, ["no 'window_s'"]),
        (stats_answer(window_s=0), ["window_s is 0", "positive"]),
        (stats_answer(window_s=-60), ["window_s is -60", "positive"]),
        (stats_answer(window_s="an hour"), ["window_s is 'an hour'", "positive"]),
        (stats_answer(models={"m": {"completion_tokens": -3}}), ["completion_tokens is -3", "cannot be negative"]),
        (stats_answer(models={"m": {"prompt_tokens": -1, "completion_tokens": 3}}), ["prompt_tokens is -1", "negative"]),
        (stats_answer(models={"m": {"requests": 1}}), ["no 'completion_tokens'"]),
        (stats_answer(models={}), ["counts no model"]),
    ],
    ids=[
        "missing",
        "not-json",
        "no-usage",
        "array",
        "no-window",
        "zero-window",
        "negative-window",
        "text-window",
        "negative-completion",
        "negative-prompt",
        "no-completion",
        "no-models",
    ],
)
def test_a_malformed_usage_file_is_one_clear_line(content: Any, fragments: list[str], cli_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "missing.json" if content is None else write(tmp_path, content)
    proc = run_cli_here("plan", "--usage", str(path), env=cli_env)
    assert_one_line_error(proc, "--usage", str(path), *fragments)


def test_usage_with_profile_is_one_clear_line(cli_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    profile = write(tmp_path, {}, "profile.json")
    proc = run_cli_here("plan", "--usage", str(write(tmp_path, stats_answer())), "--profile", str(profile), env=cli_env)
    assert_one_line_error(proc, "--usage", "--profile")


def test_experts_are_spread_evenly_over_the_fewest_gpus_and_an_expert_split_over_gpus_does_not_fit() -> None:
    """Mixtral 8x7B in bf16 on 80 GB GPUs: two GPUs by memory, four experts each (a fill of six and two
    makes the busier GPU set every layer's time). In float32 an expert (22.5 GB) is larger than an L4's
    room: the runtime holds experts whole, so the plan does not fit, whatever its numbers."""
    args = model_args("mixtral-8x7b")
    h100 = plan_tier("h100", args, GPUS["H100-80GB"], INTERCONNECTS["pcie4"], WORKLOAD, bytes_per_param=2, skew=1.2)
    assert h100.fits and h100.expert_map is not None
    assert [w["experts"] for w in h100.expert_map["workers"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # A replica of 1 + 2 GPUs launches an 8-GPU p5.48xlarge: all eight are paid for, and the head node.
    assert (h100.replicas, h100.gpus_per_replica, h100.nodes, h100.gpus, h100.node_type) == (1, 3, 1, 8, "p5.48xlarge")
    assert h100.usd_per_hour == pytest.approx(8 * GPUS["H100-80GB"].price_per_hour + HEAD.price_per_hour)
    split = plan_tier("l4", args, GPUS["L4"], INTERCONNECTS["pcie4"], WORKLOAD, bytes_per_param=4, skew=1.2)
    assert not split.fits and not split.meets_targets and split.expert_map is None
    assert "an expert (22.5 GB) is larger than one L4's room" in split.reason
