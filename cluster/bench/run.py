"""The benchmark: bring the cluster up, drive it at each concurrency, then the baseline, same run.

Order matters on a small machine: the cluster's actors are idle (asleep) while transformers
runs, and the baseline model is loaded only after the cluster is shut down, so neither run
competes with the other for cores or memory.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cluster.bench.machine import decode_floor_seconds, measure_machine
from cluster.bench.report import plot, result_row, table
from cluster.bench.runs import RunResult, load_hf, percentile, run_cluster, run_hf
from cluster.coordinator_actor import EngineOptions
from cluster.planning.profile import CALIBRATION_BATCH, TOKEN_COUNTS, Profile, measure_dispatch, measure_parts
from cluster.placement import PlacementOptions, bring_up
from mixtral.config import MixtralArgs


@dataclass(frozen=True)
class BenchSpec:
    checkpoint: Path
    args: MixtralArgs
    dtype: str
    concurrency: list[int]
    prompt_len: int
    output_len: int
    baseline: bool
    out: Path
    seed: int = 0
    repeats: int = 1  # runs per level; the run with the median tokens/s is reported


def prompts_for(spec: BenchSpec, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(spec.seed + count)
    return [[1] + torch.randint(3, spec.args.vocab_size, (spec.prompt_len - 1,), generator=g).tolist() for _ in range(count)]


def median_run(runs: list[RunResult]) -> RunResult:
    return sorted(runs, key=lambda r: r.tok_s)[len(runs) // 2]


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    import ray

    machine = measure_machine()
    cluster = bring_up(
        spec.checkpoint, spec.args, placement=PlacementOptions(),
        engine=EngineOptions(dtype=spec.dtype, max_num_seqs=max(spec.concurrency)),
    )
    ours: dict[int, RunResult] = {}
    try:
        run_cluster(cluster.coordinator, prompts_for(spec, 1), 2)  # warm-up: first calls pay for imports
        dispatch = measure_dispatch(cluster.workers, spec.args.hidden_size, spec.dtype)
        # The planner's one end-to-end point: medians over three runs, since one run's TTFT swings
        # with how the simultaneous requests happen to reach the engine.
        calibration = [run_cluster(cluster.coordinator, prompts_for(spec, CALIBRATION_BATCH), 16) for _ in range(3)]
        for c in tqdm(spec.concurrency, desc="moe-cluster", unit="level"):
            ours[c] = median_run([run_cluster(cluster.coordinator, prompts_for(spec, c), spec.output_len)
                                  for _ in range(spec.repeats)])
        load = ray.get(cluster.coordinator.expert_load.remote())
    finally:
        cluster.shutdown()
    profile = Profile(
        cores=machine.cores, dtype=spec.dtype, tokens=list(TOKEN_COUNTS), dispatch_ms=dispatch,
        max_num_batched_tokens=EngineOptions().max_num_batched_tokens,
        calibration_tpot_ms=1e3 * percentile([percentile(run.tpot_s, 50) for run in calibration], 50),
        calibration_ttft_ms=1e3 * percentile([percentile(run.ttft_s, 50) for run in calibration], 50),
        calibration_prompt_len=spec.prompt_len,
        **measure_parts(spec.args, spec.dtype, context=spec.prompt_len + spec.output_len // 2),
    )
    theirs: dict[int, RunResult] = {}
    if spec.baseline:
        model = load_hf(spec.checkpoint, spec.dtype)
        torch.set_num_threads(machine.cores)
        run_hf(model, prompts_for(spec, 1), 2)
        for c in tqdm(spec.concurrency, desc="transformers", unit="level"):
            theirs[c] = median_run([run_hf(model, prompts_for(spec, c), spec.output_len) for _ in range(spec.repeats)])
        del model
    rows = [
        result_row(c, ours[c], theirs.get(c), decode_floor_seconds(spec.args, machine, batch=c, dtype=spec.dtype))
        for c in spec.concurrency
    ]
    report = {
        "machine": machine.to_dict() | {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "checkpoint": str(spec.checkpoint),
        "dtype": spec.dtype,
        "prompt_len": spec.prompt_len,
        "output_len": spec.output_len,
        "repeats": spec.repeats,
        "results": rows,
        "expert_load": load,
    }
    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / "bench.json").write_text(json.dumps(report, indent=2))
    profile.save(spec.out / "profile.json")
    plot(rows, spec.out / "bench.png", f"{spec.checkpoint.name}, {spec.dtype}, prompt {spec.prompt_len}, output {spec.output_len}")
    return report


def summary(report: dict[str, Any]) -> str:
    m = report["machine"]
    rates = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in m["matmul_gflops"].items())
    return (
        f"machine: {m['cores']} cores ({m['cpu']}), memory read {m['bandwidth_gbs']:.1f} GB/s, matmul {rates}\n"
        f"{report['checkpoint']} in {report['dtype']}, prompt {report['prompt_len']}, output {report['output_len']}\n"
        + table(report["results"])
    )
