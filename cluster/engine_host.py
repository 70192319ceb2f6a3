"""The engine host: one engine over one replica's expert workers, whoever runs it.

    EngineHost ─ AsyncEngine ─ EngineCore ─ ModelRunner ─ MoEBlock ─ ChannelTransport ─sockets─► expert workers
      ├─ WorkerSupervisor (cluster.supervisor): opens their channels, restarts a stuck one
      └─ Rebalancer (cluster.engine.rebalance): a new expert map from live load

A dense model's host has none of the right-hand side: its ModelRunner runs the MLP itself, and
what only MoE has (expert load, maps, rebalancing, worker stats) raises NotMoE.

The CLI and the benchmark run it as a plain Ray actor in bundle 0 of the replica's placement group
(cluster.placement.bring_up: ray.remote(EngineHost)); a Serve replica is a thin shim over it
(cluster.serve.engine_deployment.EngineServer) that brings its workers up and adds the fleet views.
The engine loop runs on its own thread (AsyncEngine), so concurrent requests join the running
batch the same way under both.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.build import EngineOptions, engine_over_workers
from cluster.engine.protocol import ModelInfo, TokenEvent
from cluster.engine.rebalance import Rebalancer, ray_calls
from cluster.engine.sampling import SamplingParams
from cluster.errors import UserError
from cluster.expert_workers import WorkerSummary
from cluster.supervisor import WorkerSupervisor
from mixtral.checkpoint import Checkpoint, ReadLog
from router.expert_map import ExpertMap
from router.load import ExpertLoad, balancedness
from router.moe_block import MoEBlock
from workers.device import set_coordinator_threads
from workers.expert_worker import WorkerInfo, WorkerStats
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


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc), or its peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class NotMoE(UserError):
    """What only an MoE model has (expert load, maps, rebalancing) was asked of a dense one."""

    def __init__(self, name: str, what: str) -> None:
        super().__init__(f"{name} is a dense model (no experts): it has no {what}")


def unanswered_ping(timeout_s: float) -> RuntimeError:
    return RuntimeError(f"an expert worker did not answer a ping within {timeout_s:g} s")


class EngineHost:
    """In a Ray actor: the engine over `workers` (expert worker actors, started with `channel_secret`;
    none for a dense model), holding experts as `expert_map` says, its coordinator's GEMMs on
    `threads` threads (None: every core)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        workers: list[Any],
        channel_secret: bytes,
        options: EngineOptions,
        expert_map: ExpertMap | None = None,
        *,
        threads: int | None = None,
        worker_info: list[WorkerInfo] | None = None,
    ) -> None:
        """`worker_info`: the workers' info() where the caller has it already (else asked here)."""
        threads = set_coordinator_threads(threads)
        self.workers = workers
        self.ping_timeout_s = options.expert_timeout_s
        self.max_num_seqs = options.max_num_seqs
        self.name = checkpoint.name
        moe = checkpoint.args.is_moe
        supervisor = WorkerSupervisor.here(workers, secret=channel_secret, timeout_s=options.expert_timeout_s) if moe else None
        engine = engine_over_workers(checkpoint, supervisor, options, expert_map, threads=threads)
        self.engine = AsyncEngine(engine, Telemetry(checkpoint.name), max_waiting=options.max_waiting)
        self.model = engine.model
        feed_forward = self.model.feed_forward
        self.moe = feed_forward if isinstance(feed_forward, MoEBlock) else None
        self.worker_summary: WorkerSummary | None = None
        self.rebalancer: Rebalancer | None = None
        if self.moe is not None and supervisor is not None:
            self.worker_summary = WorkerSummary.of(worker_info or ray.get([w.info.remote() for w in workers]))
            self.rebalancer = Rebalancer(
                self.moe,
                load_experts=ray_calls(workers, "load_experts"),
                hold_only=ray_calls(workers, "hold_only"),
                set_holdings=supervisor.set_holdings,
                telemetry=Telemetry(checkpoint.name),
            )
        self._ids = 0

    def _request_id(self) -> str:
        self._ids += 1
        return f"actor-{self._ids}"

    def stream(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        """A request's tokens as they are made; closing the stream early aborts the request."""
        return self.engine.stream(prompt_ids, params, request_id)

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

    def model_info(self) -> ModelInfo:
        return ModelInfo(max_model_len=self.model.max_model_len, vocab_size=self.model.vocab_size, moe=self.moe is not None)

    def _moe(self, what: str) -> MoEBlock:
        if self.moe is None:
            raise NotMoE(self.name, what)
        return self.moe

    def expert_load(self) -> list[list[int]]:
        """Tokens routed to each expert, per layer, since start: [L][E]."""
        return self._moe("expert load").load.snapshot()

    def load_counters(self) -> dict[str, Any]:
        """The routing load's counters since start (router.load.ExpertLoad.counters), for a fleet view;
        a dense model's, its one MLP as one expert that never counted a token."""
        if self.moe is None:
            args = self.model.args
            return ExpertLoad(args.num_hidden_layers, args.num_local_experts, args.num_experts_per_tok).counters()
        return self.moe.load.counters()

    def breakdown(self, *, reset: bool = False) -> dict[str, float]:
        """Where the engine's steps spent their time since the last reset (EngineCore.breakdown)."""
        return self.engine.engine.breakdown(reset=reset)

    def engine_steps(self) -> int:
        return self.engine.engine.steps

    def stats(self) -> dict[str, float]:
        """The engine's state: sequences, KV blocks, preemptions, prefix-cache hits (core.EngineCore.stats)."""
        return self.engine.stats()

    def own_stats(self) -> dict[str, Any]:
        """The engine's state (stats), its KV pool's bytes, its resident memory, the dtype its experts
        compute in (and up to how many rows in the checkpoint's), its expert map and how evenly its
        workers are loaded."""
        own = self.engine.stats() | {"kv_cache_bytes": self.model.cache.nbytes, "resident_bytes": resident_bytes()}
        if self.moe is None or self.worker_summary is None:
            return own
        return (
            own
            | self.worker_summary.stats()
            | {
                "expert_map": self.moe.expert_map.to_json(),
                "worker_balancedness": balancedness(self.moe.worker_load.window()),
            }
        )

    def worker_stats(self) -> list[WorkerStats]:
        """Each worker's calls, forward time, bytes and rows per expert since start; raises if one
        does not answer within the expert timeout."""
        return ray.get([w.worker_stats.remote() for w in self.workers], timeout=self.ping_timeout_s)

    async def rebalance(self) -> dict[str, Any]:
        """The expert map recomputed from the load since the last rebalance, within the workers' slots
        and copies (what their memory was sized for), and applied live (Rebalance.to_json)."""
        if self.rebalancer is None:
            raise NotMoE(self.name, "experts to rebalance")
        result = await asyncio.to_thread(self.rebalancer.rebalance)
        return result.to_json()

    async def check_health(self) -> None:
        """Healthy when the engine loop runs and every expert worker answers a ping in time."""
        if not self.engine.is_alive():
            raise RuntimeError("the engine loop thread has stopped")
        # As long as the transport gives a worker before replacing it: a worker being replaced is
        # healing, and a failed check would have Serve kill the whole replica, running requests too.
        try:
            await asyncio.wait_for(asyncio.gather(*(w.info.remote() for w in self.workers)), self.ping_timeout_s)
        except asyncio.TimeoutError:
            raise unanswered_ping(self.ping_timeout_s) from None

    def stuck_step(self, bound_s: float) -> str | None:
        """Why the engine is not serving though it is alive, or None: a step that has waited on its
        expert workers longer than `bound_s` (one stopped, or being replaced). Serve's own health check
        does not read this: a replica whose worker is healing is kept, running requests and all."""
        if self.moe is None:
            return None  # nothing to wait on: the whole step runs here
        since = self.moe.transport.waiting_since
        waited = time.monotonic() - since if since is not None else 0.0
        if waited > bound_s:
            return f"a step has waited {waited:.0f} s on its expert workers (one is stopped or being replaced)"
        return None

    def read_log(self) -> ReadLog:
        return self.model.read_log()

    def shutdown(self) -> None:
        self.engine.shutdown()
