"""The capacity plan: does it fit, how many GPUs, at what latency and cost; with a dense tier beside it.

For one replica (a coordinator GPU plus expert GPUs) the planner picks the largest decode batch
whose predicted TPOT meets the target and whose KV cache fits, then adds replicas until the
workload's output tokens/s are served. Monthly costs assume GPUs rented around the clock, at fixed
volumes and, given a server's usage report (GET /v1/engine/stats), at each served model's measured one.

The dense tier is Mistral 7B as the runtime serves it: one GPU holding the embeddings, attention,
norms, the MLP and the lm_head, no router, and a KV cache whose sliding window recycles blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cluster.planning.cost_model import (
    RUNTIME_RESERVE_GB,
    Layout,
    MemorySplit,
    expert_params_all_layers,
    kv_spec,
    layout_for,
    memory_splits,
    model_params,
    step_seconds,
)
from cluster.planning.hardware import CPU_NODE, HEAD, INSTANCES, Gpu, Interconnect, nodes_for
from mixtral.config import ModelArgs, args_from_dict
from mixtral.kv_spec import GiB
from mixtral.presets import preset
from router.expert_map import ExpertMap, WorkerKind, balanced_map

if TYPE_CHECKING:
    from cluster.planning.measured_usage import MeasuredUsage

HOURS_PER_MONTH = 730  # the one figure for a month of GPUs rented around the clock, and of a measured rate kept up
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600
MONTHLY_VOLUMES = (1_000_000, 10_000_000, 100_000_000)
MAX_BATCH = 256
ACTIVATION_GB = 1.0


@dataclass(frozen=True)
class Workload:
    requests_per_s: float
    prompt_len: int
    output_len: int
    ttft_ms: float  # target
    tpot_ms: float  # target


@dataclass
class TierPlan:
    tier: str
    gpu: str
    fits: bool
    reason: str
    gpus_per_replica: int
    memory_gb: dict[str, dict[str, float]]  # "coordinator" and "expert" GPUs (or the one dense "gpu") -> split
    batch: int  # decode batch per replica
    kv_blocks: int  # KV cache blocks per replica: batch sequences of prompt + output tokens
    kv_cache_memory: float  # GiB, what `serve --kv-cache-memory` takes to allocate exactly those blocks
    tpot_ms: float
    ttft_ms: float
    replica_tok_s: float  # output tokens/s one replica sustains at that batch
    replicas: int
    gpus: int  # launched, as `plan --emit` launches them: every GPU of every node (fleet)
    nodes: int  # GPU nodes of `node_type` (0 where none is known: priced a GPU at a time)
    node_type: str | None
    meets_targets: bool
    usd_per_hour: float
    usd_per_million_tokens: float  # at the workload's load
    cpu_workers: int = 0  # per replica: CPU expert workers (a CPU node each)
    dtype: str = "bfloat16"  # the weights' and activations', as serve's --dtype
    expert_dtype: str = "bfloat16"  # what the expert weights are held in
    expert_map: dict[str, Any] | None = None  # the replica's expert map (router.expert_map JSON); None: dense
    dense: bool = False  # one GPU holding the whole model (Mistral), no expert workers
    monthly: list[dict[str, Any]] = field(default_factory=list)  # per volume: tokens, gpus, usd, usd_per_million
    # With a usage report (--usage): per served model, its measured volume priced on this tier, as `monthly`
    # prices the fixed ones, plus "model": the served model whose volume it is.
    usage_monthly: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_args(name_or_config: str | dict) -> ModelArgs:
    """A named shape (mixtral-8x7b, mini, tiny; dense: mistral-7b, mistral-tiny) or a checkpoint's config dict."""
    if isinstance(name_or_config, dict):
        return args_from_dict(name_or_config)
    return args_from_dict({"model_type": "mixtral"} | preset(name_or_config))  # a preset names model_type if not mixtral


@dataclass(frozen=True)
class Fleet:
    """What serving `replicas` replicas launches, as `plan --emit` writes it, and its price."""

    replicas: int
    node_type: str | None  # the GPU nodes' cloud type (hardware.INSTANCES); None: none known for this GPU
    nodes: int  # GPU nodes (0 where no node type is known: priced a GPU at a time)
    gpus: int  # every GPU of every node, whether a replica uses it or not
    cpu_nodes: int  # the CPU workers' nodes
    usd_per_hour: float  # the GPUs launched, the CPU workers' nodes and the head node


def fleet(replicas: int, *, gpus_per_replica: int, cpu_workers: int, gpu: Gpu) -> Fleet:
    """Whole nodes of the GPU's cloud type (a replica's 1 + 8 L4s take three 4-GPU nodes, two replicas five),
    the CPU workers' nodes, and the head node every emitted cluster has."""
    instance = INSTANCES.get(gpu.name)
    used = replicas * gpus_per_replica
    nodes = nodes_for(used, instance) if instance is not None else 0
    gpus = nodes * instance.gpus if instance is not None else used
    cpu_nodes = replicas * cpu_workers
    usd = gpus * gpu.price_per_hour + cpu_nodes * CPU_NODE.price_per_hour + (HEAD.price_per_hour or 0.0)
    return Fleet(replicas, instance.name if instance is not None else None, nodes, gpus, cpu_nodes, usd)


def monthly_cost(tokens: float, *, replica_tok_s: float, fleet_of: Callable[[int], Fleet]) -> dict[str, Any]:
    """`tokens` output tokens a month, served around the clock by whole replicas (at least one) of
    `replica_tok_s` each, on the fleet `fleet_of(replicas)` launches: tokens, replicas, nodes, gpus,
    usd, and usd_per_million (None for no tokens)."""
    rate = tokens / SECONDS_PER_MONTH
    launched = fleet_of(max(1, math.ceil(rate / replica_tok_s)))
    usd = launched.usd_per_hour * HOURS_PER_MONTH
    per_million = usd / (tokens / 1e6) if tokens else None
    return {
        "tokens": tokens,
        "replicas": launched.replicas,
        "nodes": launched.nodes,
        "gpus": launched.gpus,
        "usd": usd,
        "usd_per_million": per_million,
    }


@dataclass(frozen=True)
class ExpertOptions:
    """How the experts are held: int8 or not, at most this many a GPU, some on a CPU worker, hot copies."""

    int8: bool = False
    max_experts_per_gpu: int | None = None
    cpu_experts: int = 0
    hot_copies: int = 0


def planned_map(layout: Layout, num_experts: int) -> ExpertMap | None:
    """The layout as a map the runtime runs: expert GPUs holding experts 0.. in order (spare slots
    with copies, spread evenly until rebalancing moves them to the measured hot experts), then one
    CPU worker holding the last `cpu_experts`. None where an expert is split over GPUs (no map can say that)."""
    if layout.gpus_per_expert > 1:
        return None
    on_gpus = num_experts - layout.cpu_experts
    kinds: list[WorkerKind] = ["gpu"] * layout.expert_gpus
    if layout.hot_copies:
        gpu_part = balanced_map(
            [1.0] * on_gpus, kinds=kinds, slots_per_worker=layout.experts_per_gpu, copies=on_gpus + layout.hot_copies
        )
    else:
        gpu_part = ExpertMap.grouped(on_gpus, layout.experts_per_gpu, "gpu")
    workers = list(gpu_part.workers) + ([tuple(range(on_gpus, num_experts))] if layout.cpu_experts else [])
    return ExpertMap(num_experts, tuple(workers), gpu_part.kinds + (("cpu",) if layout.cpu_experts else ()))


def _split_dict(split: MemorySplit) -> dict[str, float]:
    return {k: round(v, 2) for k, v in asdict(split).items()} | {"headroom": round(split.headroom, 2)}


def plan_tier(
    tier: str,
    args: ModelArgs,
    gpu: Gpu,
    link: Interconnect | None,
    workload: Workload,
    *,
    bytes_per_param: int,
    skew: float,
    experts: ExpertOptions = ExpertOptions(),
    usage_volumes: dict[str, float] | None = None,
    dtype: str | None = None,
) -> TierPlan:
    """One tier on `gpu`: expert parallel for an MoE model, one GPU for a dense one. `usage_volumes`:
    output tokens a month by served model (MeasuredUsage.volumes), priced in `usage_monthly`. `dtype`:
    the weights' (float16 on a GPU without bf16); None: bfloat16 or float32 by `bytes_per_param`."""
    dtype = dtype or {2: "bfloat16", 4: "float32"}[bytes_per_param]
    dense = not args.is_moe
    context = workload.prompt_len + workload.output_len
    expert_bytes = 1 if experts.int8 and not dense else bytes_per_param
    if dense:
        layout = Layout(1, 1, 0)
        weights_gb = model_params(args) * bytes_per_param / 1e9  # what the runtime holds on its one device
    else:
        layout = layout_for(
            args,
            gpu,
            expert_bytes,
            activation_gb=ACTIVATION_GB,
            max_experts_per_gpu=experts.max_experts_per_gpu,
            cpu_experts=experts.cpu_experts,
            hot_copies=experts.hot_copies,
        )
    coordinator, worker = memory_splits(
        args, gpu, layout, bytes_per_param, kv_tokens=0, activation_gb=ACTIVATION_GB, expert_bytes_per_param=expert_bytes
    )
    if dense:
        coordinator = replace(coordinator, attention_weights=weights_gb)
    # In the engine's blocks: a sequence holds whole blocks, and a sliding window recycles them.
    spec = kv_spec(args, bytes_per_param)
    blocks_per_seq = spec.blocks_per_sequence(context, args.sliding_window)
    kv_per_seq_gb = spec.pool_bytes(blocks_per_seq) / 1e9
    max_batch_by_kv = spec.blocks_in(max(0.0, coordinator.headroom) * 1e9) // blocks_per_seq
    expert_gb = expert_params_all_layers(args) * expert_bytes / 1e9  # one expert, every layer
    cpu_gb = layout.cpu_experts * expert_gb
    cpu_fits = cpu_gb <= CPU_NODE.memory_gb - RUNTIME_RESERVE_GB - ACTIVATION_GB
    whole = layout.gpus_per_expert == 1  # the runtime holds each expert whole, on one worker
    fits = coordinator.headroom > kv_per_seq_gb and (dense or worker.headroom >= 0) and cpu_fits and whole
    reason = (
        "fits"
        if fits
        else (
            f"an expert ({expert_gb:.1f} GB) is larger than one {gpu.name}'s room and the runtime holds each expert "
            "whole on one GPU: use --expert-dtype int8, a lower --dtype or a larger GPU"
            if not whole
            else "the coordinator GPU cannot hold the non-expert weights and one sequence's KV cache"
            if coordinator.headroom <= kv_per_seq_gb
            else "an expert GPU cannot hold its expert weights"
            if worker.headroom < 0
            else f"the CPU worker cannot hold its experts' {cpu_gb:.0f} GB"
        )
    )

    def step(tokens: int, sequences: int) -> float:
        return step_seconds(
            args,
            gpu,
            None if dense else link,
            layout,
            tokens=tokens,
            sequences=sequences,
            context=context,
            bytes_per_param=bytes_per_param,
            skew=skew,
            expert_bytes_per_param=expert_bytes,
        )

    prefill_s = step(workload.prompt_len, 1)
    batch = 1
    for candidate in (2**i for i in range(int(math.log2(MAX_BATCH)) + 1)):
        if candidate <= max(1, max_batch_by_kv) and 1e3 * step(candidate, candidate) <= workload.tpot_ms:
            batch = candidate
    tpot_s = step(batch, batch)
    replica_tok_s = batch * workload.output_len / (workload.output_len * tpot_s + batch * prefill_s)
    ttft_s = prefill_s + tpot_s
    demand = workload.requests_per_s * workload.output_len
    replicas = max(1, math.ceil(demand / replica_tok_s))

    def fleet_of(n: int) -> Fleet:
        return fleet(n, gpus_per_replica=layout.gpus, cpu_workers=layout.cpu_workers, gpu=gpu)

    launched = fleet_of(replicas)
    usd_per_hour = launched.usd_per_hour
    kv_blocks = batch * blocks_per_seq  # the pool the engine allocates with --kv-cache-memory below
    coordinator = replace(coordinator, kv_cache=spec.pool_bytes(kv_blocks) / 1e9)
    memory = (
        {"gpu": _split_dict(coordinator)} if dense else {"coordinator": _split_dict(coordinator), "expert": _split_dict(worker)}
    )
    plan = TierPlan(
        tier=tier,
        gpu=gpu.name,
        fits=fits,
        reason=reason,
        gpus_per_replica=layout.gpus,
        memory_gb=memory,
        batch=batch,
        kv_blocks=kv_blocks,
        kv_cache_memory=spec.pool_bytes(kv_blocks) / GiB,
        tpot_ms=1e3 * tpot_s,
        ttft_ms=1e3 * ttft_s,
        replica_tok_s=replica_tok_s,
        replicas=replicas,
        gpus=launched.gpus,
        nodes=launched.nodes,
        node_type=launched.node_type,
        meets_targets=fits and 1e3 * tpot_s <= workload.tpot_ms and 1e3 * ttft_s <= workload.ttft_ms,
        usd_per_hour=usd_per_hour,
        usd_per_million_tokens=usd_per_hour / (demand * 3600 / 1e6) if demand else float("inf"),
        cpu_workers=layout.cpu_workers,
        dtype=dtype,
        expert_dtype="int8" if expert_bytes == 1 else dtype,
        expert_map=None if dense or (m := planned_map(layout, args.num_local_experts)) is None else m.to_json(),
        dense=dense,
    )

    def month(tokens: float) -> dict[str, Any]:
        return monthly_cost(tokens, replica_tok_s=replica_tok_s, fleet_of=fleet_of)

    plan.monthly = [month(volume) for volume in MONTHLY_VOLUMES]
    plan.usage_monthly = [{"model": model} | month(tokens) for model, tokens in (usage_volumes or {}).items()]
    return plan


def plan(
    args: ModelArgs,
    gpu: Gpu,
    link: Interconnect,
    workload: Workload,
    *,
    bytes_per_param: int = 2,
    skew: float = 1.2,
    name: str = "model",
    experts: ExpertOptions = ExpertOptions(),
    usage: MeasuredUsage | None = None,
    dtype: str | None = None,
) -> list[TierPlan]:
    """The MoE model on expert-parallel GPUs, and dense Mistral 7B on the same GPU type, side by side;
    each priced at the monthly volumes a usage report measured, if one is given."""
    volumes = usage.volumes if usage is not None else None
    kind = "expert parallel" if args.is_moe else "dense"
    return [
        plan_tier(
            f"{name} ({kind})",
            args,
            gpu,
            link,
            workload,
            bytes_per_param=bytes_per_param,
            skew=skew,
            experts=experts,
            usage_volumes=volumes,
            dtype=dtype,
        ),
        plan_tier(
            "mistral-7b (dense)",
            model_args("mistral-7b"),
            gpu,
            None,
            workload,
            bytes_per_param=bytes_per_param,
            skew=1.0,
            usage_volumes=volumes,
            dtype=dtype,
        ),
    ]
