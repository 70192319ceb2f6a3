"""The engine deployment: a Serve replica that is the coordinator, with its expert workers.

Serve reserves one placement group per replica (placement_group_bundles): the replica runs in
bundle 0, and starts expert worker e in bundle 1 + e. Its methods are the EngineClient contract
(cluster.engine.protocol) that the ingress reaches through a DeploymentHandle. Load, stats and
metrics answer for every replica (cluster.serve.fleet), from the snapshots each publishes to the
deployment's ReplicaRegistry; record_autoscaling_stats feeds cluster.serve.autoscaling's policy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.build import EngineOptions, engine_over_workers
from cluster.engine.protocol import ModelInfo, TokenEvent
from cluster.engine.rebalance import Rebalancer, ray_calls
from cluster.engine.sampling import SamplingParams
from cluster.placement import ReplicaLayout, start_workers, wait_loaded
from cluster.placement_options import PlacementOptions
from cluster.serve.fleet import fleet_load, fleet_metrics, fleet_stats
from cluster.serve.replica_registry import HEARTBEAT_S, REGISTRY_ACTOR, ReplicaSnapshot
from mixtral.checkpoint import Checkpoint
from router.load import balancedness
from router.trace import replica_trace_path
from router.wire import new_secret
from workers.device import set_coordinator_threads
from workers.telemetry import Telemetry, local_families

log = logging.getLogger("ray.serve")  # into the replica's Serve log

PUBLISH_PERIOD_S = 2.0  # while it works, a replica's snapshot in the registry is at most this old
FRESH_S = 1.0  # a view publishes this replica's snapshot first unless it published this recently


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc), or its peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class EngineServer:
    def __init__(self, checkpoint: Checkpoint, engine: EngineOptions, placement: PlacementOptions, layout: ReplicaLayout) -> None:
        import ray
        from ray import serve

        self.replica = serve.get_replica_context().replica_id.unique_id
        if engine.trace_path:  # one file per replica: replicas never write over each other's trace
            engine = replace(engine, trace_path=str(replica_trace_path(Path(engine.trace_path), self.replica)))
        threads = set_coordinator_threads(placement.coordinator_threads)
        pg = ray.util.get_current_placement_group()
        assert pg is not None, "the engine deployment runs in its placement group (placement_group_bundles)"
        secret = new_secret()  # per replica: only this coordinator can talk to its workers
        self.workers = start_workers(checkpoint, pg, secret=secret, engine=engine, placement=placement, layout=layout)
        wait_loaded([w.info.remote() for w in self.workers], progress=False)
        self.engine = AsyncEngine(
            engine_over_workers(checkpoint, self.workers, secret, engine, layout.expert_map, threads=threads),
            Telemetry(checkpoint.name),
            max_waiting=engine.max_waiting,
        )
        self.coordinator = self.engine.engine.model
        self.ping_timeout_s = engine.expert_timeout_s
        infos = ray.get([w.info.remote() for w in self.workers])
        self.expert_compute_dtype = "/".join(sorted({i.compute_dtype for i in infos}))
        self.expert_half_rows = max(i.half_rows for i in infos)
        self.expert_packed_workers = sum(i.packed for i in infos)
        log.info(
            "experts compute in %s (checkpoint dtype %s); %d of %d workers hold their matrices packed for oneDNN's GEMM",
            self.expert_compute_dtype,
            self.coordinator.dtype,
            self.expert_packed_workers,
            len(infos),
        )
        self.max_num_seqs = engine.max_num_seqs
        self.rebalancer = Rebalancer(
            self.coordinator,
            load_experts=ray_calls(self.workers, "load_experts"),
            hold_only=ray_calls(self.workers, "hold_only"),
            telemetry=Telemetry(checkpoint.name),
        )
        self._registry_handle: Any = serve.get_deployment_actor(REGISTRY_ACTOR)
        self._published_at = 0.0  # time.monotonic() of the last publish
        self._stopping = threading.Event()
        self._publish_lock = threading.Lock()
        self._publisher = threading.Thread(target=self._publish_loop, name="replica-publisher", daemon=True)
        self._publisher.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        """Stream a request's tokens; a cancelled stream aborts it."""
        async for event in self.engine.stream(prompt_ids, params, request_id):
            yield event

    def model_info(self) -> ModelInfo:
        return ModelInfo(max_model_len=self.coordinator.max_model_len, vocab_size=self.coordinator.vocab_size)

    def own_stats(self) -> dict[str, Any]:
        """This replica's engine state (scheduler.Engine.stats), its KV pool's bytes, its resident memory,
        the dtype its experts compute in (and up to how many rows in the checkpoint's), its expert map
        and how evenly its workers are loaded."""
        return self.engine.stats() | {
            "kv_cache_bytes": self.coordinator.cache.nbytes,
            "resident_bytes": resident_bytes(),
            "expert_compute_dtype": self.expert_compute_dtype,
            "expert_half_rows": self.expert_half_rows,  # calls of up to this many rows an expert in the checkpoint's bf16
            "expert_packed_workers": self.expert_packed_workers,  # workers.device.onednn_packs
            "expert_map": self.coordinator.expert_map.to_json(),
            "worker_balancedness": balancedness(self.coordinator.worker_load.window()),
        }

    async def rebalance(self) -> dict[str, Any]:
        """This replica's expert map recomputed from its load since its last rebalance, within its
        workers' slots and copies (what their memory was sized for), and applied live."""
        result = await asyncio.to_thread(self.rebalancer.rebalance)
        log.info("rebalanced experts: %s", result.to_json())
        return result.to_json() | {"replica": self.replica}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What cluster.serve.autoscaling.EngineLoadPolicy reads; Serve calls it on the replica's metrics period."""
        stats = self.engine.stats()
        return {
            "running": stats["running"],
            "waiting": stats["waiting"],
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_usage": stats["kv_cache_usage"],
        }

    async def expert_load(self) -> dict[str, Any]:
        """Load-balancing report since start over every replica: per layer and expert, per worker, per replica."""
        return fleet_load(await self._fleet())

    async def stats(self) -> dict[str, Any]:
        """Engine stats over every replica (cluster.serve.fleet.fleet_stats)."""
        return fleet_stats(await self._fleet())

    async def metrics(self) -> bytes:
        """Prometheus text of every serving replica's moe_ series."""
        return fleet_metrics(await self._fleet())

    async def _fleet(self) -> list[ReplicaSnapshot]:
        """Every replica's latest snapshot, with this replica's taken now (published too, unless it
        published within FRESH_S); where the registry cannot be reached, this replica's alone."""
        serving = not self._stopping.is_set()
        own: ReplicaSnapshot | None = None
        try:
            own = await asyncio.to_thread(self._snapshot, serving=serving)
            if time.monotonic() - self._published_at > FRESH_S:
                await asyncio.to_thread(self._publish, snapshot=own)
        except Exception as e:  # a worker being replaced, or the registry being recreated
            log.warning("could not take or publish this replica's snapshot (%s)", e)
        try:
            snapshots: list[ReplicaSnapshot] = await self._registry().all.remote()
        except Exception as e:  # the registry being recreated by Serve
            log.warning("could not read the replica registry (%s); answering for this replica alone", e)
            snapshots = []
        if own is None:  # its workers' rows as last published
            mine = [s for s in snapshots if s.replica == self.replica]
            own = self._own_snapshot(workers=mine[0].workers if mine else [], serving=serving)
        return sorted([s for s in snapshots if s.replica != self.replica] + [own], key=lambda s: s.replica)

    def _registry(self) -> Any:
        """The registry actor; Serve recreates it if it fails its health checks, so look it up again then."""
        from ray import serve

        if self._registry_handle is None:
            self._registry_handle = serve.get_deployment_actor(REGISTRY_ACTOR)
        return self._registry_handle

    def _snapshot(self, *, serving: bool) -> ReplicaSnapshot:
        import ray

        workers = ray.get([w.worker_stats.remote() for w in self.workers], timeout=self.ping_timeout_s)
        rows = [
            {
                "worker": w.worker,
                "experts": w.experts,
                "tokens": sum(w.tokens.values()),
                "calls": w.calls,
                "forward_ms": 1e3 * w.forward_seconds,
                "bytes_in": w.bytes_in,
                "bytes_out": w.bytes_out,
            }
            for w in workers
        ]
        return self._own_snapshot(workers=rows, serving=serving)

    def _own_snapshot(self, *, workers: list[dict[str, Any]], serving: bool) -> ReplicaSnapshot:
        return ReplicaSnapshot(
            replica=self.replica,
            serving=serving,
            load=self.coordinator.load.counters(),
            workers=workers,
            stats=self.own_stats(),
            families=local_families(),
        )

    def _publish(self, *, serving: bool = True, snapshot: ReplicaSnapshot | None = None) -> None:
        import ray

        with self._publish_lock:
            if (snapshot.serving if snapshot else serving) and self._stopping.is_set():
                return  # the last snapshot, which says the replica stopped, is in or on its way
            snapshot = snapshot or self._snapshot(serving=serving)
            try:
                ray.get(self._registry().publish.remote(snapshot), timeout=self.ping_timeout_s)
            except ray.exceptions.RayActorError:
                self._registry_handle = None  # recreated by Serve: found again on the next publish
                raise
            self._published_at = time.monotonic()

    def _publish_loop(self) -> None:
        """Publish after every period that had engine steps, and at least every HEARTBEAT_S."""
        published_steps, published_at = -1, 0.0
        while not self._stopping.wait(PUBLISH_PERIOD_S):
            steps = self.engine.engine.steps
            if steps == published_steps and time.monotonic() - published_at < HEARTBEAT_S:
                continue
            try:
                self._publish()
                published_steps, published_at = steps, time.monotonic()
            except Exception as e:  # a worker being replaced: try again next period
                log.warning("could not publish this replica's snapshot (%s); retrying", e)

    async def __del__(self) -> None:
        """Serve awaits this once the replica has drained (graceful shutdown): its last snapshot says it stopped."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            await asyncio.to_thread(self._publish, serving=False)
        except Exception as e:
            log.warning("could not publish this replica's last snapshot (%s)", e)
        self.engine.shutdown()

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
