"""The coordinator as a plain Ray actor (CLI and benchmark): non-expert weights, KV cache, engine loop.

The engine loop runs on its own thread (AsyncEngine), so concurrent requests join the running
batch exactly as they do behind the Serve endpoint.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.build import EngineOptions, engine_over_workers
from cluster.engine.sampling import SamplingParams
from mixtral.checkpoint import Checkpoint, ReadLog
from router.expert_map import ExpertMap
from workers.device import set_coordinator_threads
from workers.telemetry import Telemetry


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
    def __init__(
        self,
        checkpoint: Checkpoint,
        workers: list[Any],
        channel_secret: bytes,
        options: EngineOptions,
        expert_map: ExpertMap | None = None,
        *,
        threads: int | None = None,
    ) -> None:
        threads = set_coordinator_threads(threads)
        engine = engine_over_workers(checkpoint, workers, channel_secret, options, expert_map, threads=threads)
        self.engine = AsyncEngine(engine, Telemetry(checkpoint.name), max_waiting=options.max_waiting)
        self.coordinator = self.engine.engine.model
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
            if events[-1].finish_reason == "error":
                raise RuntimeError("the engine failed while generating this request")
            return GenerationResult(
                [e.token_id for e in events], [e.logprob for e in events], events[-1].finish_reason or "length"
            )

        return list(await asyncio.gather(*(one(prompt, p) for prompt, p in zip(prompts, params))))

    async def generate_timed(self, prompt: list[int], params: SamplingParams) -> list[TimedToken]:
        """One request, with the time each token was made, returned when it finishes.

        For benchmarks: requests still arrive separately and join the running batch as users'
        do, but tokens come back in one reply instead of one Ray object each, which on a
        2-core machine would cost more than the step itself at high concurrency.
        """
        tokens = [
            TimedToken(e.token_id, time.time(), e.finish_reason)
            async for e in self.engine.stream(prompt, params, self._request_id())
        ]
        if tokens[-1].finish_reason == "error":
            raise RuntimeError("the engine failed while generating this request")
        return tokens

    def expert_load(self) -> list[list[int]]:
        """Tokens routed to each expert, per layer, since start: [L][E]."""
        return self.coordinator.load.snapshot()

    def engine_steps(self) -> int:
        return self.engine.engine.steps

    def stats(self) -> dict[str, float]:
        """The engine's state: sequences, KV blocks, preemptions, prefix-cache hits (scheduler.Engine.stats)."""
        return self.engine.stats()

    def read_log(self) -> ReadLog:
        return self.coordinator.read_log()
