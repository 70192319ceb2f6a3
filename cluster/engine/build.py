"""One way to build an engine: the coordinator over a transport, its routing observers, and the
scheduler over it. The CLI, the Ray actors, the Serve deployment, the benchmark and the tests all
build through here.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.engine.block_pool import BlockPool
from cluster.engine.core import EngineCore
from cluster.engine.kv_manager import KVManager
from cluster.engine.routing_metrics import RoutingMetrics
from cluster.errors import UserError
from cluster.model_runner import ModelRunner
from mixtral.checkpoint import Checkpoint
from mixtral.config import DType, ExpertDType, MixtralArgs, resolve_dtype
from mixtral.kv_spec import BLOCK_SIZE, GiB, KVSpec
from router.channel_transport import ChannelTransport
from router.expert_map import ExpertMap
from router.load import ExpertLoad, WorkerLoad
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


def build_engine(
    checkpoint: Checkpoint,
    transport: ExpertTransport,
    options: EngineOptions,
    *,
    device: str = "cpu",
    expert_map: ExpertMap | None = None,
    threads: int | None = None,
) -> EngineCore[ModelRunner]:
    """The coordinator over `transport`, whose workers hold the experts as `expert_map` says (None:
    one expert per worker), on `threads` threads (None: every core), with a routing trace when one
    was asked for, and the scheduler over it."""
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
    coordinator = ModelRunner(
        checkpoint,
        transport,
        dtype=resolve_dtype(args, options.dtype),
        max_num_seqs=options.max_num_seqs,
        max_model_len=options.max_model_len,
        kv_cache_bytes=None if options.kv_cache_memory_gb is None else int(options.kv_cache_memory_gb * GiB),
        gpu_memory_utilization=options.gpu_memory_utilization,
        block_size=options.block_size,
        device=device,
        load=load,
        observers=observers,
        overlap_min_tokens=options.overlap_min_tokens,
        expert_map=expert_map,
        worker_load=worker_load,
        threads=threads,
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
    )


def check_kv_budget(args: MixtralArgs, options: EngineOptions) -> None:
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
    """Every expert worker in this process: for tests, and as the one-process baseline. The
    coordinator's GEMMs run on `coordinator_threads` (None: every core, as they are set by default)."""
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
    link: WorkerLink,
    options: EngineOptions,
    expert_map: ExpertMap | None = None,
    *,
    threads: int | None = None,
) -> EngineCore[ModelRunner]:
    """In a Ray actor: the engine over the expert workers `link` reaches (cluster.supervisor), holding
    experts as `expert_map` says, on the device Ray assigned, its coordinator's GEMMs on `threads`
    (set_coordinator_threads' answer). Built on a passing thread, so that the
    engine loop's thread is the only one with an OpenMP team in the actor and its threads spin between
    regions (workers.device.ComputeThread)."""

    def build() -> EngineCore[ModelRunner]:
        transport = ChannelTransport(link)
        return build_engine(checkpoint, transport, options, device=assigned_device(), expert_map=expert_map, threads=threads)

    return on_passing_thread(build)
