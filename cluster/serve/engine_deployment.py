"""The engine deployment: a Serve replica that is an engine host (cluster.engine_host), with its expert workers.

A thin shim: the engine is EngineHost's, as under the CLI. What the shim adds is what only a Serve
replica has:

    bring-up  Serve reserves one placement group per replica (placement_group_bundles): the replica
              runs in bundle 0, and starts expert worker w in bundle 1 + w (cluster.expert_workers)
    views     load, stats and metrics answer for every replica (cluster.serve.fleet), from the
              snapshots each publishes to the deployment's ReplicaRegistry (replica_publisher)
    scaling   record_autoscaling_stats feeds cluster.serve.autoscaling's policy
    draining  __del__ publishes the replica's last snapshot, then stops its engine

Its methods are the EngineClient contract (cluster.engine.protocol) that the ingress reaches
through a DeploymentHandle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from cluster.engine.build import EngineOptions
from cluster.engine.protocol import ModelInfo, TokenEvent
from cluster.engine.sampling import SamplingParams
from cluster.engine_host import EngineHost, unanswered_ping
from cluster.expert_workers import ReplicaLayout, start_workers, wait_loaded
from cluster.placement_options import PlacementOptions
from cluster.serve.fleet import fleet_load, fleet_metrics, fleet_stats
from cluster.serve.fresh import Fresh
from cluster.serve.replica_publisher import ReplicaPublisher
from mixtral.checkpoint import Checkpoint
from router.trace import replica_trace_path
from router.wire import new_secret

log = logging.getLogger("ray.serve")  # into the replica's Serve log
VIEW_MAX_AGE_S = 1.0  # how old what /metrics and /health answer from may be


class EngineServer:
    def __init__(self, checkpoint: Checkpoint, engine: EngineOptions, placement: PlacementOptions, layout: ReplicaLayout) -> None:
        import ray
        from ray import serve

        self.replica = serve.get_replica_context().replica_id.unique_id
        if engine.trace_path:  # one file per replica: replicas never write over each other's trace
            engine = replace(engine, trace_path=str(replica_trace_path(Path(engine.trace_path), self.replica)))
        pg = ray.util.get_current_placement_group()
        assert pg is not None, "the engine deployment runs in its placement group (placement_group_bundles)"
        secret = new_secret()  # per replica: only this replica's engine can talk to its workers
        workers = start_workers(checkpoint, pg, secret=secret, engine=engine, placement=placement, layout=layout)
        info = wait_loaded([w.info.remote() for w in workers], progress=False)
        self.host = EngineHost(
            checkpoint, workers, secret, engine, layout.expert_map, threads=placement.coordinator_threads, worker_info=info
        )
        if (summary := self.host.worker_summary) is not None:
            log.info(
                "experts compute in %s (checkpoint dtype %s); %d of %d workers hold their matrices packed for oneDNN's GEMM",
                summary.compute_dtype,
                self.host.model.dtype,
                summary.packed_workers,
                summary.num_workers,
            )
        self.publisher = ReplicaPublisher(self.host, replica=self.replica)
        # /metrics and /health need no API key: a scrape loop gets answers at most VIEW_MAX_AGE_S old,
        # not a Ray call per worker each time. Serve's own health check reads the same; the keyed views
        # (stats, expert load) stay live, as a client reads them right after its own requests.
        self._scrape = Fresh(self.publisher.fleet, max_age_s=VIEW_MAX_AGE_S)
        self._health = Fresh(self.host.check_health, max_age_s=VIEW_MAX_AGE_S)
        self.stuck_step_s = engine.stuck_step_s

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        """Stream a request's tokens; a cancelled stream aborts it."""
        async for event in self.host.stream(prompt_ids, params, request_id):
            yield event

    def model_info(self) -> ModelInfo:
        return self.host.model_info()

    def own_stats(self) -> dict[str, Any]:
        """This replica's engine state and memory, how its experts compute, its expert map and
        how evenly its workers are loaded (EngineHost.own_stats)."""
        return self.host.own_stats()

    async def rebalance(self) -> dict[str, Any]:
        """This replica's expert map recomputed from its load since its last rebalance, within its
        workers' slots and copies (what their memory was sized for), and applied live."""
        result = await self.host.rebalance()
        log.info("rebalanced experts: %s", result)
        return result | {"replica": self.replica}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What cluster.serve.autoscaling.EngineLoadPolicy reads; Serve calls it on the replica's metrics period."""
        stats = self.host.stats()
        return {
            "running": stats["running"],
            "waiting": stats["waiting"],
            "max_num_seqs": self.host.max_num_seqs,
            "kv_cache_usage": stats["kv_cache_usage"],
        }

    async def expert_load(self) -> dict[str, Any]:
        """Load-balancing report since start over every replica: per layer and expert, per worker, per replica."""
        return fleet_load(await self.publisher.fleet())

    async def stats(self) -> dict[str, Any]:
        """Engine stats over every replica (cluster.serve.fleet.fleet_stats)."""
        return fleet_stats(await self.publisher.fleet())

    async def metrics(self) -> bytes:
        """Prometheus text of every serving replica's moe_ series."""
        return fleet_metrics(await self._scrape.get())

    async def __del__(self) -> None:
        """Serve awaits this once the replica has drained (graceful shutdown): its last snapshot says it stopped."""
        if await self.publisher.stop():
            self.host.shutdown()

    async def health(self) -> None:
        """What GET /health reports: check_health's answer, and a step stuck on its workers past
        stuck_step_s (which Serve's own check tolerates, as the worker is healing)."""
        if problem := self.host.stuck_step(self.stuck_step_s):  # first: it answers at once, a ping may not
            raise RuntimeError(problem)
        try:  # the pings go on for Serve's check (shielded); this answer waits no longer than a stuck step would
            await asyncio.wait_for(asyncio.shield(self._health.get()), self.stuck_step_s)
        except asyncio.TimeoutError:
            raise unanswered_ping(self.stuck_step_s) from None

    async def check_health(self) -> None:
        """Healthy when the engine loop runs and every expert worker answers a ping in time."""
        await self._health.get()
