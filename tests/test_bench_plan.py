"""The benchmark (against transformers, same run) and the capacity planner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cluster.planning.cost_model import kv_spec
from cluster.planning.planner import model_args
from router.trace import read_trace
from tests.test_cli import assert_one_line_error, run_cli, run_cli_here


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_bench_against_llamacpp_on_the_same_weights_checks_its_tokens_and_reports_both(
    make_ckpt, cli_env, ray_address, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from cluster.bench.llamacpp import MISSING, available

    if not available():
        pytest.skip(f"llama.cpp baseline not run: {MISSING}")
    out = tmp_path / "bench"
    checkpoint = make_ckpt(tokenizer=True, vocab_size=32000)  # llama.cpp reads the vocabulary from the GGUF
    options = ["--experts-per-worker", "8", "--concurrency", "1,2", "--prompt-len", "16", "--output-len", "12"]
    proc = run_cli(
        "bench", str(checkpoint), *options, "--baseline", "hf,llamacpp", "--out", str(out), "--json",
        env=cli_env | {"RAY_ADDRESS": ray_address}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # a token of llama.cpp's unlike the cluster's fails the run
    one, two = last_json(proc.stdout)["results"]
    assert one["llamacpp_tok_s"] > 0 and one["llamacpp_ratio"] == pytest.approx(one["tok_s"] / one["llamacpp_tok_s"])
    assert one["baseline_tok_s"] > 0 and "llamacpp_tok_s" not in two  # llama.cpp decodes one sequence: concurrency 1
    assert "llama.cpp tok/s" in proc.stdout and "hf tok/s" in proc.stdout
    assert json.loads((out / "bench.json").read_text())["results"][0]["llamacpp_tpot_p50_ms"] > 0


def test_bench_against_llamacpp_needs_concurrency_1_in_one_line(make_ckpt, cli_env) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli_here("bench", str(make_ckpt()), "--baseline", "llamacpp", "--concurrency", "4,8", env=cli_env)
    assert_one_line_error(proc, "llama.cpp at concurrency 1", "include 1 in --concurrency")


def test_bench_against_llamacpp_without_the_extra_is_one_clear_line(make_ckpt, cli_env) -> None:  # type: ignore[no-untyped-def]
    from cluster.bench.llamacpp import available

    if available():
        pytest.skip("llama-cpp-python is installed here: the baseline runs (the test above)")
    proc = run_cli_here("bench", str(make_ckpt()), "--baseline", "llamacpp", env=cli_env)
    assert_one_line_error(proc, "llama-cpp-python is not installed", "pip install -e '.[llamacpp]'")


def test_bench_with_hf_baseline_writes_table_json_plot_and_profile(make_ckpt, cli_env, ray_address, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench"
    proc = run_cli(
        "bench",
        str(make_ckpt()),
        "--experts-per-worker",
        "8",  # one worker holding every expert
        "--expert-dtype",
        "int8",
        "--concurrency",
        "1,4",
        "--prompt-len",
        "8",
        "--output-len",
        "4",
        "--baseline",
        "hf",
        "--repeats",
        "2",
        "--out",
        str(out),
        "--json",
        "--breakdown",
        env=cli_env | {"RAY_ADDRESS": ray_address},  # joins the session's Ray, as a user's job joins a cluster
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    results = last_json(proc.stdout)["results"]
    # Where the steps' time went, timed in the engine actor: the parts account for nearly all of a step.
    assert "where a step's time goes" in proc.stdout
    for r in results:
        b = r["breakdown"]
        assert b["steps"] >= 4 and b["accounted"] >= 0.9, b
        assert b["attention"] > 0 and b["dispatch"] > 0 and b["wait"] > 0 and b["head"] > 0 and b["mlp"] == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["expert_map"]["workers"] == [{"experts": list(range(8)), "kind": "auto"}]
    assert report["expert_dtype"] == "int8"
    assert (report["num_workers"], report["expert_packed_workers"]) == (1, 0)  # int8 weights never go to oneDNN's float GEMM
    assert [r["concurrency"] for r in results] == [1, 4]
    for r in results:
        assert r["tok_s"] > 0 and r["baseline_tok_s"] > 0
        assert r["ratio"] == pytest.approx(r["tok_s"] / r["baseline_tok_s"])
        # One ratio per pair of runs taken in turn (cluster, then transformers, same prompts).
        assert len(r["pair_ratios"]) == 2 and all(x > 0 for x in r["pair_ratios"])
        assert 0 < r["floor_fraction"] <= 1.5 and r["tpot_p50_ms"] <= r["tpot_p99_ms"]
    assert "hf tok/s" in proc.stdout and "ratio" in proc.stdout
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "bench.json").read_text())["results"] == results
    profile = json.loads((out / "profile.json").read_text())
    assert profile["cores"] >= 1 and len(profile["expert_ms"]) == len(profile["tokens"])


def test_bench_bad_mixed_input_is_one_clear_line(make_ckpt, cli_env) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli_here("bench", str(make_ckpt()), "--workload", "mixed", "--hf-batch-size", "0", env=cli_env)
    assert_one_line_error(proc, "--hf-batch-size")


def test_plan_mixtral_8x7b_bf16_fits_on_eight_24gb_gpus_plus_a_coordinator(cli_env) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("plan", "--model", "mixtral-8x7b", "--gpu", "L4", "--dtype", "bfloat16", "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    moe, dense = last_json(proc.stdout)["plans"]
    assert moe["fits"] and moe["gpus_per_replica"] == 9
    # One expert over all 32 layers is 5.6B parameters: 11.3 GB in bf16 (DESIGN.md).
    assert moe["memory_gb"]["expert"]["expert_weights"] == pytest.approx(11.27, abs=0.01)
    assert moe["memory_gb"]["expert"]["headroom"] > 0 and moe["memory_gb"]["coordinator"]["headroom"] > 0
    assert [m["tokens"] for m in moe["monthly"]] == [1_000_000, 10_000_000, 100_000_000]
    assert dense["tier"].startswith("mistral-7b") and dense["gpus_per_replica"] == 1
    assert "per month" in proc.stdout


def test_kv_cache_per_token_is_128_kib_for_mixtral() -> None:
    assert kv_spec(model_args("mixtral-8x7b"), 2).bytes_per_token == 128 * 1024


@pytest.mark.parametrize("window", [None, 40])
def test_the_planner_and_the_engine_count_the_same_kv_bytes(make_ckpt, window: int | None) -> None:  # type: ignore[no-untyped-def]
    from cluster.engine.build import EngineOptions, local_engine
    from cluster.planning.hardware import GPUS
    from cluster.planning.planner import Workload, plan_tier
    from mixtral.checkpoint import Checkpoint
    from mixtral.kv_spec import GiB

    checkpoint = Checkpoint.open(make_ckpt(**({"sliding_window": window} if window else {})))
    workload = Workload(requests_per_s=1, prompt_len=90, output_len=37, ttft_ms=1e4, tpot_ms=1e4)  # 127: not whole blocks
    tier = plan_tier("small", checkpoint.args, GPUS["T4"], None, workload, bytes_per_param=4, skew=1.0)
    assert tier.batch > 1
    context = workload.prompt_len + workload.output_len
    for budget in (tier.kv_cache_memory, None):  # the budget the plan names, and the engine's default for the batch
        options = EngineOptions(kv_cache_memory_gb=budget, max_model_len=context, max_num_seqs=tier.batch)
        engine = local_engine(checkpoint, options)
        assert engine.kv.num_blocks == tier.kv_blocks
        assert engine.model.cache.nbytes == tier.kv_cache_memory * GiB
        assert round(engine.model.cache.nbytes / 1e9, 2) == tier.memory_gb["coordinator"]["kv_cache"]


def test_plan_takes_skew_from_a_routing_trace(make_ckpt, cli_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cluster.engine.build import EngineOptions, local_engine
    from cluster.engine.sampling import SamplingParams
    from mixtral.checkpoint import Checkpoint

    path = tmp_path / "trace.msgpack"
    engine = local_engine(Checkpoint.open(make_ckpt()), EngineOptions(trace_path=str(path)))
    engine.generate([[1, 5, 9, 30, 31]], [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)])
    proc = run_cli("plan", "--trace", str(path), "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout)["skew"] == pytest.approx(read_trace(path).skew())
    assert read_trace(path).skew() > 1


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--gpu", "Z80"], "unknown GPU"),
        (["--interconnect", "carrier-pigeon"], "unknown interconnect"),
        (["--model", "gpt-5"], "unknown preset"),
        (["--tpot-ms", "0"], "positive"),
        (["--profile", "/nonexistent/profile.json"], "does not exist"),
        (["--requests-per-s", "1e308"], "plans cover up to 1e+06 requests a second; got 1e+308"),
        (["--trace", "/nonexistent/trace.jsonl"], "--trace: /nonexistent/trace.jsonl: no routing trace there"),
        (["--gpu", "T4"], "T4 has no bfloat16 (its tensor cores take float16, float32): plan --dtype float16"),
        (["--prompt-len", "100000"], "100000 + 256 tokens is longer than mixtral-8x7b's context of 32768 tokens"),
        (["--model", "mini", "--prompt-len", "8000", "--output-len", "193"], "longer than mini's context of 8192"),
    ],
)
def test_plan_bad_input_is_one_clear_line(args: list[str], fragment: str, cli_env) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(run_cli_here("plan", *args, env=cli_env), fragment)


def test_a_gpu_table_entry_that_cannot_be_planned_is_one_clear_line_and_a_t4_plans_in_float16(cli_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    entry = {"name": "Z", "memory_gb": 24, "bandwidth_gbs": 300, "tflops": 100, "price_per_hour": 1.0}
    for wrong, fragment in (
        ({"bandwidth_gbs": 0}, "Z: bandwidth_gbs must be a positive number, not 0"),
        ({"memory_gb": -1}, "Z: memory_gb must be a positive number, not -1"),
        ({"price_per_hour": "cheap"}, "Z: price_per_hour must be a number of dollars, not 'cheap'"),
        ({"dtypes": ["fp8"]}, "Z: dtypes must name some of bfloat16, float16, float32, not ['fp8']"),
        ({"dtypes": "float16"}, 'Z: dtypes must be a list, such as ["float16"]'),
        ({"memory_gb": True}, "Z: memory_gb must be a positive number, not True"),
        ({"bandwidth": 300}, "expected a JSON list of {name, memory_gb, bandwidth_gbs, tflops, price_per_hour, dtypes}"),
    ):
        path = tmp_path / "gpus.json"
        path.write_text(json.dumps([entry | wrong]))
        assert_one_line_error(run_cli_here("plan", "--gpus-file", str(path), "--gpu", "Z", env=cli_env), fragment)
    path.write_text(json.dumps([entry | {"dtypes": ["float16"]}]))  # a GPU of the user's, without bf16
    assert_one_line_error(run_cli_here("plan", "--gpus-file", str(path), "--gpu", "Z", env=cli_env), "Z has no bfloat16")
    assert run_cli_here("plan", "--gpus-file", str(path), "--gpu", "Z", "--dtype", "float16", env=cli_env).returncode == 0
    assert run_cli_here("plan", "--gpu", "T4", "--dtype", "float16", env=cli_env).returncode == 0
    assert_one_line_error(run_cli_here("experiments", "--gpus", "L4,T4", env=cli_env), "T4 has no bfloat16")


@pytest.mark.skipif(
    os.environ.get("MOE_TIMING_TESTS") != "1",
    reason="timing-sensitive: compares measured tokens/s, which the rest of the suite disturbs on a 2-core machine; "
    "run alone on an idle machine with MOE_TIMING_TESTS=1",
)
def test_planner_calibrated_by_bench_predicts_mini_within_25_percent(cli_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "mini"
    proc = run_cli(
        "bench",
        "mini",
        "--concurrency",
        "1,8",
        "--prompt-len",
        "32",
        "--output-len",
        "12",
        "--out",
        str(out),
        "--repeats",
        "3",
        "--json",
        env=cli_env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(
        "plan",
        "--model",
        "mini",
        "--profile",
        str(out / "profile.json"),
        "--concurrency",
        "1,8",
        "--prompt-len",
        "32",
        "--output-len",
        "12",
        "--skew",
        "1.0",
        "--json",
        env=cli_env,
    )
    assert proc.returncode == 0, proc.stderr
    for row in last_json(proc.stdout)["predictions"]:
        assert row["predicted_tok_s"] == pytest.approx(row["measured_tok_s"], rel=0.25), row


def test_experiments_sweep_writes_table_and_plot(cli_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli(
        "experiments", "--gpus", "L4,H100-80GB", "--skews", "1.0,1.5", "--batches", "1,64", "--out", str(tmp_path), env=cli_env
    )
    assert proc.returncode == 0, proc.stderr
    rows = [
        line
        for line in (tmp_path / "experiments.md").read_text().splitlines()
        if line.startswith("| L4") or line.startswith("| H100")
    ]
    assert len(rows) == 2 * 2 * 2
    cost = {(r.split("|")[1].strip(), r.split("|")[3].strip()): float(r.split("|")[7]) for r in rows if "| 1.0 |" in r}
    assert cost[("L4", "64")] < cost[("L4", "1")]  # a fuller batch spreads the same GPUs over more tokens
    assert (tmp_path / "experiments.png").read_bytes()[:4] == b"\x89PNG"
