"""The benchmark: bring the cluster up and drive it at each concurrency, beside the baseline.

The two take turns, one run each, level by level: on a shared machine the rate of the cores and
of memory drifts over minutes, and runs minutes apart would measure the drift as much as the
code. Only one of them computes at a time: the cluster's actors are asleep while transformers
runs, and the baseline model sits idle in this process while the cluster runs (both copies of
the weights must fit in memory, as they do for mini on a 24 GB machine).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from cluster.bench.calibrate import measure_dispatch, measure_parts
from cluster.bench.llamacpp import check_tokens, load_llamacpp, run_llamacpp
from cluster.bench.machine import Machine, decode_floor_seconds, measure_machine
from cluster.bench.mixed import mixed_requests, mixed_row, mixed_table, run_hf_static, write_mixed
from cluster.bench.report import llamacpp_fields, plot, result_row, table
from cluster.bench.runs import RunResult, load_hf, median_run, percentile, run_cluster, run_hf
from cluster.engine.build import EngineOptions
from cluster.placement import bring_up
from cluster.placement_options import PlacementOptions
from cluster.planning.profile import CALIBRATION_BATCH, TOKEN_COUNTS, Profile
from mixtral.checkpoint import Checkpoint
from mixtral.config import DType, ExpertDType
from router.expert_map import ExpertMap


@dataclass(frozen=True)
class BenchSpec:
    checkpoint: Checkpoint
    dtype: DType
    concurrency: list[int]
    prompt_len: int
    output_len: int
    baseline: bool
    out: Path
    seed: int = 0
    repeats: int = 1  # runs per level (each side); the run with the median tokens/s is reported
    workload: Literal["equal", "mixed"] = "equal"
    requests: int = 64  # mixed: how many (prompt_len and output_len are then the largest drawn)
    hf_batch_size: int | None = None  # mixed: the baseline's static batch; None: all requests in one
    kv_cache_memory_gb: float | None = None
    expert_map: ExpertMap | None = None  # None: cluster.placement.default_map
    expert_dtype: ExpertDType | None = None
    llamacpp: bool = False  # also llama.cpp on the same weights as GGUF (cluster.bench.llamacpp), at concurrency 1
    breakdown: bool = False  # on a GPU, time the step's parts synchronised (EngineOptions.synchronized_timing)


def prompts_for(spec: BenchSpec, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(spec.seed + count)
    return [
        [1] + torch.randint(3, spec.checkpoint.args.vocab_size, (spec.prompt_len - 1,), generator=g).tolist()
        for _ in range(count)
    ]


def load_baseline(spec: BenchSpec, cores: int) -> Any:
    """transformers' model on every core of this process, warmed up."""
    model = load_hf(spec.checkpoint.path, spec.dtype)
    torch.set_num_threads(cores)
    run_hf(model, prompts_for(spec, 1), 2)
    return model


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    import ray

    machine = measure_machine(tuple(dict.fromkeys(("float32", spec.dtype))))
    if spec.workload == "mixed":
        return run_mixed(spec, machine)
    cluster = bring_up(
        spec.checkpoint,
        placement=PlacementOptions(expert_map=spec.expert_map),
        engine=engine_options(spec, max_num_seqs=max(spec.concurrency)),
    )
    ours: dict[int, list[RunResult]] = {c: [] for c in spec.concurrency}
    theirs: dict[int, list[RunResult]] = {c: [] for c in spec.concurrency}
    try:
        run_cluster(cluster.coordinator, prompts_for(spec, 1), 2)  # warm-up: first calls pay for imports
        dispatch = measure_dispatch(cluster.workers, cluster.channel_secret, spec.checkpoint.args.hidden_size, spec.dtype)
        # The planner's one end-to-end point: medians over three runs, since one run's TTFT swings
        # with how the simultaneous requests happen to reach the engine.
        calibration = [run_cluster(cluster.coordinator, prompts_for(spec, CALIBRATION_BATCH), 16) for _ in range(3)]
        model = load_baseline(spec, machine.cores) if spec.baseline else None
        llm = llamacpp_checked(spec, cluster.coordinator, machine.cores) if spec.llamacpp else None
        llama_runs: dict[int, list[RunResult]] = {c: [] for c in spec.concurrency}
        breakdowns: dict[int, list[dict[str, float]]] = {c: [] for c in spec.concurrency}
        levels = [c for c in spec.concurrency for _ in range(spec.repeats)]
        for c in tqdm(levels, desc="moe-cluster" + (" and transformers" if model else ""), unit="run"):
            prompts = prompts_for(spec, c)
            ray.get(cluster.coordinator.breakdown.remote(reset=True))  # this run's steps only
            ours[c].append(run_cluster(cluster.coordinator, prompts, spec.output_len))
            breakdowns[c].append(ray.get(cluster.coordinator.breakdown.remote(reset=True)))
            if model is not None:
                theirs[c].append(run_hf(model, prompts, spec.output_len))
            if llm is not None and c == 1:
                llama_runs[c].append(run_llamacpp(llm, prompts, spec.output_len))
        del model, llm
        load = ray.get(cluster.coordinator.expert_load.remote())
    finally:
        cluster.shutdown()
    profile = Profile(
        cores=machine.cores,
        dtype=spec.dtype,
        tokens=list(TOKEN_COUNTS),
        dispatch_ms=dispatch,
        max_num_batched_tokens=EngineOptions().max_num_batched_tokens,
        calibration_tpot_ms=1e3 * percentile([percentile(run.tpot_s, 50) for run in calibration], 50),
        calibration_ttft_ms=1e3 * percentile([percentile(run.ttft_s, 50) for run in calibration], 50),
        calibration_prompt_len=spec.prompt_len,
        **measure_parts(spec.checkpoint.args, spec.dtype, context=spec.prompt_len + spec.output_len // 2),
    )
    rows = [
        result_row(c, ours[c], theirs[c], decode_floor_seconds(spec.checkpoint.args, machine, batch=c, dtype=spec.dtype))
        | llamacpp_fields(ours[c], llama_runs[c])
        | {"breakdown": breakdowns[c][ours[c].index(median_run(ours[c]))]}  # the reported run's steps
        for c in spec.concurrency
    ]
    report = {
        "machine": machine_dict(machine),
        "workload": "equal",
        "checkpoint": str(spec.checkpoint.path),
        "dtype": spec.dtype,
        "prompt_len": spec.prompt_len,
        "output_len": spec.output_len,
        "repeats": spec.repeats,
        "results": rows,
        "expert_load": load,
        "expert_compute_dtype": compute_dtype(cluster.worker_info),
        "expert_half_rows": max(w.half_rows for w in cluster.worker_info),
        "expert_packed_workers": sum(w.packed for w in cluster.worker_info),
        "num_workers": len(cluster.worker_info),
        "expert_map": cluster.layout.expert_map.to_json() if cluster.layout.expert_map else None,
        "expert_dtype": spec.expert_dtype,
    }
    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / "bench.json").write_text(json.dumps(report, indent=2))
    profile.save(spec.out / "profile.json")
    plot(
        rows, spec.out / "bench.png", f"{spec.checkpoint.name}, {spec.dtype}, prompt {spec.prompt_len}, output {spec.output_len}"
    )
    return report


def llamacpp_checked(spec: BenchSpec, coordinator: Any, cores: int) -> Any:
    """llama.cpp on the checkpoint as GGUF in the bench's dtype, its greedy tokens checked equal to the
    cluster's on the first prompt before any run is timed (cluster.bench.llamacpp)."""
    import ray

    from cluster.engine.sampling import SamplingParams

    llm = load_llamacpp(spec.checkpoint, spec.dtype, spec.out, context=spec.prompt_len + spec.output_len + 16, threads=cores)
    [prompt] = prompts_for(spec, 1)
    params = SamplingParams(max_tokens=spec.output_len, temperature=0, ignore_eos=True)
    [ours] = ray.get(coordinator.generate.remote([prompt], [params]))
    check_tokens(llm, prompt, ours.token_ids)
    return llm


def run_mixed(spec: BenchSpec, machine: Machine) -> dict[str, Any]:
    """The mixed workload (cluster.bench.mixed) on a cluster of its own."""
    cluster = bring_up(spec.checkpoint, placement=PlacementOptions(expert_map=spec.expert_map), engine=engine_options(spec))
    try:
        return mixed_on(cluster.coordinator, spec, machine, expert_compute_dtype=compute_dtype(cluster.worker_info))
    finally:
        cluster.shutdown()


def compute_dtype(workers: list[Any]) -> str:
    """What the expert workers' GEMMs ran in (workers.device.matmul_dtype): one dtype, or each worker's."""
    return "/".join(sorted({w.compute_dtype for w in workers}))


def mixed_on(coordinator: Any, spec: BenchSpec, machine: Machine, *, expert_compute_dtype: str | None = None) -> dict[str, Any]:
    """All the mixed requests at once into this coordinator actor, against static batches of them;
    writes bench.json and bench.png into spec.out and returns the report."""
    import ray

    requests = mixed_requests(
        spec.requests,
        max_prompt=spec.prompt_len,
        max_output=spec.output_len,
        vocab_size=spec.checkpoint.args.vocab_size,
        seed=spec.seed,
    )
    hf_batch_size = spec.hf_batch_size or len(requests)
    prompts, output_lens = [r.prompt for r in requests], [r.output_len for r in requests]
    run_cluster(coordinator, [[1, 2, 3, 4]], 2)  # warm-up, with a prompt of its own: first calls pay for imports
    model = load_baseline(spec, machine.cores) if spec.baseline else None
    ours: list[RunResult] = []
    theirs: list[RunResult] = []
    for _ in tqdm(range(spec.repeats), desc="mixed workload" + (", and transformers" if model else ""), unit="run"):
        ours.append(run_cluster(coordinator, prompts, output_lens))
        if model is not None:
            theirs.append(run_hf_static(model, requests, hf_batch_size))
    del model
    row = mixed_row(median_run(ours), median_run(theirs) if theirs else None, ray.get(coordinator.stats.remote()))
    report = {
        "machine": machine_dict(machine),
        "workload": "mixed",
        "checkpoint": str(spec.checkpoint.path),
        "dtype": spec.dtype,
        "prompt_len": [min(map(len, prompts)), max(map(len, prompts))],
        "output_len": [min(output_lens), max(output_lens)],
        "hf_batch_size": hf_batch_size if spec.baseline else None,
        "repeats": spec.repeats,
        "results": [row],
        "expert_compute_dtype": expert_compute_dtype or spec.dtype,
    }
    title = f"{spec.checkpoint.name}, {spec.dtype}: {len(requests)} requests of mixed lengths"
    write_mixed(report, spec.out, title)
    return report


def engine_options(spec: BenchSpec, **options: Any) -> EngineOptions:
    # Prefix caching off: the same prompts come back in the warm-up, the calibration runs and every
    # repeat, and served from the cache they would measure the cache rather than the engine.
    return EngineOptions(
        dtype=spec.dtype,
        kv_cache_memory_gb=spec.kv_cache_memory_gb,
        prefix_caching=False,
        expert_dtype=spec.expert_dtype,
        synchronized_timing=spec.breakdown,
        **options,
    )


def machine_dict(machine: Machine) -> dict[str, Any]:
    return machine.to_dict() | {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}


def summary(report: dict[str, Any]) -> str:
    m = report["machine"]
    rates = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in m["matmul_gflops"].items())
    head = f"machine: {m['cores']} cores ({m['cpu']}), memory read {m['bandwidth_gbs']:.1f} GB/s, matmul {rates}\n"
    if report.get("expert_compute_dtype", report["dtype"]) != report["dtype"]:
        head += (
            f"experts compute in {report['expert_compute_dtype']}: this CPU's {report['dtype']} matmul is slow "
            f"(weights upcast once, at load)\n"
        )
    if report.get("expert_half_rows"):
        rows = report["expert_half_rows"]
        head += f"calls of up to {rows} row{'s' * (rows > 1)} an expert run on the checkpoint's {report['dtype']} matrices\n"
    if packed := report.get("expert_packed_workers"):
        head += f"{packed} of {report['num_workers']} workers hold their matrices packed for oneDNN's GEMM\n"
    if report["workload"] == "mixed":
        (low_p, high_p), (low_o, high_o) = report["prompt_len"], report["output_len"]
        return (
            head + f"{report['checkpoint']} in {report['dtype']}, prompts of {low_p}-{high_p} tokens, "
            f"outputs of {low_o}-{high_o}\n" + mixed_table(report["results"][0], report["hf_batch_size"])
        )
    return (
        head
        + f"{report['checkpoint']} in {report['dtype']}, prompt {report['prompt_len']}, output {report['output_len']}\n"
        + table(report["results"])
    )
