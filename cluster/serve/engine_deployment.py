"""The engine deployment: a Serve replica that is the coordinator, with its expert workers.

Serve reserves one placement group per replica (placement_group_bundles): the replica runs in
bundle 0, and starts expert worker e in bundle 1 + e. Its methods are the EngineClient contract
(cluster.engine.protocol) that the ingress reaches through a DeploymentHandle.
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import AsyncIterator
from typing import Any

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.build import EngineOptions, engine_over_workers
from cluster.engine.protocol import ModelInfo, TokenEvent
from cluster.engine.sampling import SamplingParams
from cluster.placement import start_workers, wait_loaded
from cluster.placement_options import PlacementOptions
from mixtral.checkpoint import Checkpoint
from router.wire import new_secret
from workers.device import set_coordinator_threads
from workers.telemetry import Telemetry


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc), or its peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class EngineServer:
    def __init__(self, checkpoint: Checkpoint, engine: EngineOptions, placement: PlacementOptions, gpus: bool) -> None:
        import ray

        set_coordinator_threads(placement.coordinator_threads)
        pg = ray.util.get_current_placement_group()
        assert pg is not None, "the engine deployment runs in its placement group (placement_group_bundles)"
        secret = new_secret()  # per replica: only this coordinator can talk to its workers
        self.workers = start_workers(checkpoint, pg, secret=secret, dtype=engine.dtype, placement=placement, gpus=gpus)
        wait_loaded([w.info.remote() for w in self.workers], progress=False)
        self.engine = AsyncEngine(
            engine_over_workers(checkpoint, self.workers, secret, engine),
            Telemetry(checkpoint.name),
            max_waiting=engine.max_waiting,
        )
        self.coordinator = self.engine.engine.model
        self.ping_timeout_s = engine.expert_timeout_s

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        """Stream a request's tokens; a cancelled stream aborts it."""
        async for event in self.engine.stream(prompt_ids, params, request_id):
            yield event

    def model_info(self) -> ModelInfo:
        return ModelInfo(max_model_len=self.coordinator.max_model_len, vocab_size=self.coordinator.vocab_size)

    def stats(self) -> dict[str, float]:
        """The engine's state (scheduler.Engine.stats), its KV pool's bytes, and this replica's resident memory."""
        return self.engine.stats() | {"kv_cache_bytes": self.coordinator.cache.nbytes, "resident_bytes": resident_bytes()}

    async def expert_load(self) -> dict[str, Any]:
        """Load-balancing report since start: per layer and expert, and per worker."""
        workers = await asyncio.gather(*(w.worker_stats.remote() for w in self.workers))
        return self.coordinator.load.report() | {
            "workers": [
                {
                    "expert": w.expert,
                    "calls": w.calls,
                    "forward_ms": 1e3 * w.forward_seconds,
                    "bytes_in": w.bytes_in,
                    "bytes_out": w.bytes_out,
                }
                for w in workers
            ]
        }

    async def check_health(self) -> None:
        """Healthy when the engine loop runs and every expert worker answers a ping in time."""
        if not self.engine.is_alive():
            raise RuntimeError("the engine loop thread has stopped")
        # As long as the transport gives a worker before replacing it: a worker being replaced is
        # healing, and a failed check would have Serve kill the whole replica, running requests too.
        timeout = self.ping_timeout_s
        try:
            await asyncio.wait_for(asyncio.gather(*(w.info.remote() for w in self.workers)), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"an expert worker did not answer a ping within {timeout:g} s") from None
