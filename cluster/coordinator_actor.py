"""The coordinator as a plain Ray actor (CLI and benchmark): non-expert weights, KV cache, engine loop.

The engine loop runs on its own thread (AsyncEngine), so concurrent requests join the running
batch exactly as they do behind the Serve endpoint.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.async_engine import AsyncEngine
from cluster.coordinator import Coordinator
from cluster.engine import Engine
from cluster.sampling import SamplingParams
from mixtral.checkpoint import ReadLog
from router.trace import TraceWriter
from router.transport import ChannelTransport, ExpertTransport
from workers.device import assigned_device, set_coordinator_threads


@dataclass(frozen=True)
class EngineOptions:
    dtype: str | None = None  # None: the checkpoint's own dtype
    max_num_seqs: int = 64  # cap on running sequences; more wait in a queue
    max_num_batched_tokens: int = 2048  # per-step token budget (decode tokens + prefill chunks)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    trace_path: str | None = None  # record each token's chosen experts here (msgpack), opt-in
    trace_max_bytes: int = 64 << 20  # recording stops when the trace file reaches this size
    # Steps with at least this many tokens run as two micro-batches in flight (two-batch overlap):
    # the coordinator's attention for one overlaps the experts' work on the other. None: never.
    # Measured on mini, 2 cores: prefill of 64 prompts of 128 in 35 s alone and 29-30 s overlapped
    # (steps of 2048 tokens); a decode step of 64 in 660 ms alone and 950 ms overlapped, since
    # halving small batches doubles the calls and the experts' weight reads. Since the coordinator
    # uses every core, a 2048-token step is the same either way on 2 cores (4.37 against 4.32 s);
    # on GPUs the coordinator and the experts are different devices, and there it is true overlap.
    overlap_min_tokens: int | None = 1024


def make_coordinator(checkpoint: str | Path, transport: ExpertTransport, options: EngineOptions, *, device: str = "cpu") -> Coordinator:
    """The coordinator for these options, with a routing trace when one was asked for."""
    from mixtral.config import load_args

    trace = None
    if options.trace_path:
        args = load_args(checkpoint)
        trace = TraceWriter(options.trace_path, layers=args.num_hidden_layers, experts=args.num_local_experts,
                            top_k=args.num_experts_per_tok, max_bytes=options.trace_max_bytes)
    return Coordinator(
        checkpoint, transport, dtype=options.dtype, max_num_seqs=options.max_num_seqs,
        max_model_len=options.max_model_len, device=device, trace=trace, overlap_min_tokens=options.overlap_min_tokens,
    )


def channel_transport(workers: list[Any]) -> ChannelTransport:
    """Sockets from this process (the coordinator's) to each expert worker."""
    import ray

    return ChannelTransport(workers, ray.get_runtime_context().get_node_id())


def engine_over(coordinator: Coordinator, options: EngineOptions) -> Engine:
    return Engine(
        coordinator, coordinator.cache, eos_token_ids=coordinator.args.eos_token_ids,
        max_num_seqs=options.max_num_seqs, max_num_batched_tokens=options.max_num_batched_tokens,
    )


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass(frozen=True)
class TimedToken:
    token_id: int
    time: float  # time.time() on the coordinator when the token reached the stream
    finish_reason: str | None


class CoordinatorActor:
    def __init__(self, checkpoint: str | Path, workers: list[Any], options: EngineOptions, *, threads: int | None = None) -> None:
        set_coordinator_threads(threads)
        self.coordinator = make_coordinator(checkpoint, channel_transport(workers), options, device=assigned_device())
        self.engine = AsyncEngine(engine_over(self.coordinator, options), self.coordinator.telemetry)
        self._ids = 0

    def _request_id(self) -> str:
        self._ids += 1
        return f"actor-{self._ids}"

    async def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
        """Run these requests to completion, batched together; results in request order."""
        for prompt, p in zip(prompts, params, strict=True):
            self.engine.engine.check_request(prompt, p)  # all or nothing: no request starts if one is bad

        async def one(prompt: list[int], p: SamplingParams) -> GenerationResult:
            events = [e async for e in self.engine.stream(prompt, p, self._request_id())]
            return GenerationResult([e.token_id for e in events], [e.logprob for e in events], events[-1].finish_reason or "length")

        return list(await asyncio.gather(*(one(prompt, p) for prompt, p in zip(prompts, params))))

    async def generate_timed(self, prompt: list[int], params: SamplingParams) -> list[TimedToken]:
        """One request, with the time each token was made, returned when it finishes.

        For benchmarks: requests still arrive separately and join the running batch as users'
        do, but tokens come back in one reply instead of one Ray object each, which on a
        2-core machine would cost more than the step itself at high concurrency.
        """
        return [TimedToken(e.token_id, time.time(), e.finish_reason)
                async for e in self.engine.stream(prompt, params, self._request_id())]

    def expert_load(self) -> list[list[int]]:
        """Tokens routed to each expert, per layer, since start: [L][E]."""
        return self.coordinator.load.snapshot()

    def engine_steps(self) -> int:
        return self.engine.engine.steps

    def read_log(self) -> ReadLog:
        return self.coordinator.read_log()
