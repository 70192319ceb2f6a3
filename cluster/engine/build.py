"""One way to build an engine: the model runner with its feed-forward (Mixtral's MoE block over a
transport to the expert workers, with its routing observers, or Mistral's dense MLP), and the
scheduler over it. The CLI, the Ray actors, the Serve deployment, the benchmark and the tests all
build through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.engine.block_pool import BlockPool
from cluster.engine.core import EngineCore
from cluster.engine.kv_manager import KVManager
from cluster.engine.routing_metrics import RoutingMetrics
from cluster.errors import UserError
from cluster.model_runner import ModelRunner
from mixtral.checkpoint import Checkpoint
from mixtral.config import DType, ExpertDType, ModelArgs, resolve_dtype
from mixtral.feed_forward import DenseMLP, FeedForward, FeedForwardFactory
from mixtral.kv_spec import BLOCK_SIZE, GiB, KVSpec
from mixtral.step_clock import StepClock
from router.channel_transport import ChannelTransport
from router.expert_map import ExpertMap
from router.load import ExpertLoad, WorkerLoad
from router.moe_block import MoEBlock
from router.observer import RoutingObserver
from router.trace import TraceWriter
from router.transport import ExpertTransport, LocalTransport, WorkerLink
from router.wire import new_secret
from workers.device import assigned_device, on_passing_thread
from workers.expert_worker import ExpertWorker
from workers.telemetry import Telemetry


@dataclass(frozen=True)
class EngineOptions:
    dtype: DType | None = None  # None: the checkpoint's own dtype
    expert_dtype: ExpertDType | None = None  # int8: weight-only int8 experts (mixtral.int8); None: as dtype
    max_num_seqs: int = 64  # cap on running sequences; more wait in a queue
    max_num_batched_tokens: int = 2048  # per-step token budget (decode tokens + prefill chunks)
    max_waiting: int | None = 256  # requests queued beyond the running ones; more are refused (503). None: unbounded
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # The KV cache's memory in GiB, allocated once as a pool of blocks. None: enough for
    # max_num_seqs sequences of max_model_len, at most 90% of a GPU's free memory or 4 GiB on a CPU.
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float | None = None  # of the coordinator's GPU, for its weights and KV; None: 90% of free
    block_size: int = BLOCK_SIZE  # tokens per KV block
    prefix_caching: bool = True  # share the blocks of common prompt prefixes between requests
    # An expert that has not answered a layer call in this long is killed, restarted by Ray, and
    # sent the call again. Far above any one call's compute, which it must never cut short.
    expert_timeout_s: float = 60.0
    # GET /health answers 503 while a step has waited this long on its expert workers (one stopped, or
    # being replaced); Serve's own health check keeps the replica, which is healing.
    stuck_step_s: float = 30.0
    trace_path: str | None = None  # record each token's chosen experts here (msgpack), opt-in
    trace_max_bytes: int = 64 << 20  # recording stops when the trace file reaches this size
    # Steps with at least this many tokens run as two micro-batches in flight (two-batch overlap):
    # the coordinator's attention for one overlaps the experts' work on the other. None: never.
    # Decode steps stay one batch: halving small expert batches doubles the calls and the weight
    # reads. The README has the measurements behind the default.
    overlap_min_tokens: int | None = 1024
    # On a GPU, wait for the device at each timed part's start and end (mixtral.step_clock), so that the
    # breakdown counts a part's kernels in it: for `bench --breakdown`, not for serving (it costs the
    # overlap of launches and kernels). No effect on a CPU.
    synchronized_timing: bool = False


def moe_block(
    checkpoint: Checkpoint, transport: ExpertTransport, options: EngineOptions, expert_map: ExpertMap | None
) -> FeedForwardFactory:
    """Mixtral's feed-forward: the routers over `transport`, whose workers hold the experts as
    `expert_map` says (None: one expert per worker), watched by the routing metrics and, when one
    was asked for, a routing trace."""
    args = checkpoint.args
    load = ExpertLoad(args.num_hidden_layers, args.num_local_experts, args.num_experts_per_tok)
    expert_map = expert_map or ExpertMap.one_per_worker(args.num_local_experts)
    worker_load = WorkerLoad(expert_map.num_workers)
    observers: list[RoutingObserver] = [RoutingMetrics(Telemetry(checkpoint.name), load, worker_load)]
    if options.trace_path:
        observers.append(
            TraceWriter(
                options.trace_path,
                layers=args.num_hidden_layers,
                experts=args.num_local_experts,
                top_k=args.num_experts_per_tok,
                max_bytes=options.trace_max_bytes,
            )
        )

    def build(weights: dict[str, torch.Tensor], packed: bool, clock: StepClock) -> FeedForward:
        gates = MoEBlock.gates_of(weights, args.num_hidden_layers)
        return MoEBlock(
            gates,
            args.num_experts_per_tok,
            transport,
            load=load,
            observers=observers,
            expert_map=expert_map,
            worker_load=worker_load,
            clock=clock,
        )

    return build


def dense_mlp(checkpoint: Checkpoint) -> FeedForwardFactory:
    """Mistral's feed-forward: each layer's MLP, on the coordinator's device."""
    return lambda weights, packed, clock: DenseMLP.of(weights, checkpoint.args.num_hidden_layers, packed=packed, clock=clock)


def check_dense_options(args: ModelArgs, options: EngineOptions, *, name: str) -> None:
    """UserError for an MoE-only option given for a dense model (they would be ignored)."""
    if args.is_moe:
        return
    if options.trace_path:
        raise UserError(f"{name} is a dense model: it routes no tokens to experts, so it has no routing trace; drop --trace-path")
    if options.expert_dtype:
        raise UserError(f"{name} is a dense model: it has no experts to hold in {options.expert_dtype}; drop --expert-dtype")


def build_engine(
    checkpoint: Checkpoint,
    transport: ExpertTransport | None,
    options: EngineOptions,
    *,
    device: str = "cpu",
    expert_map: ExpertMap | None = None,
    threads: int | None = None,
) -> EngineCore[ModelRunner]:
    """The model runner on `threads` threads (None: every core) with its model's feed-forward (for
    Mixtral the MoE block over `transport`, which a dense model does without: None), and the
    scheduler over it."""
    args = checkpoint.args
    check_dense_options(args, options, name=checkpoint.name)
    if args.is_moe:
        if transport is None:
            raise ValueError(f"{checkpoint.name} is an MoE model: its engine needs a transport to its expert workers")
        feed_forward = moe_block(checkpoint, transport, options, expert_map)
    else:
        feed_forward = dense_mlp(checkpoint)
    coordinator = ModelRunner(
        checkpoint,
        feed_forward,
        dtype=resolve_dtype(args, options.dtype),
        max_num_seqs=options.max_num_seqs,
        max_model_len=options.max_model_len,
        kv_cache_bytes=None if options.kv_cache_memory_gb is None else int(options.kv_cache_memory_gb * GiB),
        gpu_memory_utilization=options.gpu_memory_utilization,
        block_size=options.block_size,
        device=device,
        overlap_min_tokens=options.overlap_min_tokens,
        threads=threads,
        synchronized_timing=options.synchronized_timing,
    )
    kv = KVManager(
        BlockPool(coordinator.cache.num_blocks),
        block_size=options.block_size,
        window=args.sliding_window,
        prefix_caching=options.prefix_caching,
    )
    return EngineCore(
        coordinator,
        kv,
        eos_token_ids=args.eos_token_ids,
        max_num_seqs=options.max_num_seqs,
        max_num_batched_tokens=options.max_num_batched_tokens,
        clock=coordinator.clock,
    )


def check_kv_budget(args: ModelArgs, options: EngineOptions) -> None:
    """Raise UserError if the KV budget asked for cannot hold one sequence of max_model_len (before any actor starts)."""
    if options.kv_cache_memory_gb is None:
        return
    dtype = options.dtype or args.dtype
    max_model_len = args.context_length(options.max_model_len)
    spec = KVSpec.of(args, dtype, options.block_size)
    if problem := spec.budget_problem(options.kv_cache_memory_gb * GiB, max_model_len, args.sliding_window):
        raise UserError(problem)


def local_engine(
    checkpoint: Checkpoint,
    options: EngineOptions = EngineOptions(),
    expert_map: ExpertMap | None = None,
    *,
    worker_threads: int = 1,
    coordinator_threads: int | None = None,
) -> EngineCore[ModelRunner]:
    """Every expert worker in this process (a dense model has none): for tests, and as the one-process
    baseline. The coordinator's GEMMs run on `coordinator_threads` (None: every core, as they are set by default)."""
    if not checkpoint.args.is_moe:
        return build_engine(checkpoint, None, options, threads=coordinator_threads)
    expert_map = expert_map or ExpertMap.one_per_worker(checkpoint.args.num_local_experts)
    workers = [
        ExpertWorker(
            checkpoint,
            experts,
            worker=w,
            channel_secret=new_secret(),
            dtype=options.dtype,
            threads=worker_threads,
            expert_dtype=options.expert_dtype,
        )
        for w, experts in enumerate(expert_map.workers)
    ]
    return build_engine(checkpoint, LocalTransport(workers), options, expert_map=expert_map, threads=coordinator_threads)


def engine_over_workers(
    checkpoint: Checkpoint,
    link: WorkerLink | None,
    options: EngineOptions,
    expert_map: ExpertMap | None = None,
    *,
    threads: int | None = None,
) -> EngineCore[ModelRunner]:
    """In a Ray actor: the engine over the expert workers `link` reaches (cluster.supervisor; None for a
    dense model, which has none), holding
    experts as `expert_map` says, on the device Ray assigned, its coordinator's GEMMs on `threads`
    (set_coordinator_threads' answer). Built on a passing thread, so that the
    engine loop's thread is the only one with an OpenMP team in the actor and its threads spin between
    regions (workers.device.ComputeThread)."""

    def build() -> EngineCore[ModelRunner]:
        transport = ChannelTransport(link) if link is not None else None
        return build_engine(checkpoint, transport, options, device=assigned_device(), expert_map=expert_map, threads=threads)

    return on_passing_thread(build)
