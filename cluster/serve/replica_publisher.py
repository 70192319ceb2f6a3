"""A replica's snapshots, published to the deployment's ReplicaRegistry, and the fleet read back.

A replica publishes every PUBLISH_PERIOD_S while it works (at least every HEARTBEAT_S), at once
when a fleet view is asked of it (unless it published within FRESH_S), and a last time, saying it
stopped, when Serve drains it (cluster.serve.replica_registry says why).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import ray

from cluster.engine_host import EngineHost
from cluster.serve.replica_registry import HEARTBEAT_S, REGISTRY_ACTOR, ReplicaSnapshot
from workers.telemetry import local_families

log = logging.getLogger("ray.serve")  # into the replica's Serve log

PUBLISH_PERIOD_S = 2.0  # while it works, a replica's snapshot in the registry is at most this old
FRESH_S = 1.0  # a view publishes this replica's snapshot first unless it published this recently


class ReplicaPublisher:
    """Publishes the snapshots of `host`, the engine of replica `replica`, on a thread of its own."""

    def __init__(self, host: EngineHost, *, replica: str) -> None:
        self.host = host
        self.replica = replica
        self._registry_handle: Any = None
        self._registry()  # found at start, as the deployment's actors are started before its replicas
        self._published_at = 0.0  # time.monotonic() of the last publish
        self._stopping = threading.Event()
        self._publish_lock = threading.Lock()
        self._publisher = threading.Thread(target=self._publish_loop, name="replica-publisher", daemon=True)
        self._publisher.start()

    async def fleet(self) -> list[ReplicaSnapshot]:
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

    async def stop(self) -> bool:
        """Publish the last snapshot, which says the replica stopped; False if it was stopped already."""
        if self._stopping.is_set():
            return False
        self._stopping.set()
        try:
            await asyncio.to_thread(self._publish, serving=False)
        except Exception as e:
            log.warning("could not publish this replica's last snapshot (%s)", e)
        return True

    def _registry(self) -> Any:
        """The registry actor; Serve recreates it if it fails its health checks, so look it up again then."""
        from ray import serve

        if self._registry_handle is None:
            self._registry_handle = serve.get_deployment_actor(REGISTRY_ACTOR)
        return self._registry_handle

    def _snapshot(self, *, serving: bool) -> ReplicaSnapshot:
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
            for w in self.host.worker_stats()
        ]
        return self._own_snapshot(workers=rows, serving=serving)

    def _own_snapshot(self, *, workers: list[dict[str, Any]], serving: bool) -> ReplicaSnapshot:
        return ReplicaSnapshot(
            replica=self.replica,
            serving=serving,
            load=self.host.load_counters(),
            workers=workers,
            stats=self.host.own_stats(),
            families=local_families(),
        )

    def _publish(self, *, serving: bool = True, snapshot: ReplicaSnapshot | None = None) -> None:
        with self._publish_lock:
            if (snapshot.serving if snapshot else serving) and self._stopping.is_set():
                return  # the last snapshot, which says the replica stopped, is in or on its way
            snapshot = snapshot or self._snapshot(serving=serving)
            try:
                ray.get(self._registry().publish.remote(snapshot), timeout=self.host.ping_timeout_s)
            except ray.exceptions.RayActorError:
                self._registry_handle = None  # recreated by Serve: found again on the next publish
                raise
            self._published_at = time.monotonic()

    def _publish_loop(self) -> None:
        """Publish after every period that had engine steps, and at least every HEARTBEAT_S."""
        published_steps, published_at = -1, 0.0
        while not self._stopping.wait(PUBLISH_PERIOD_S):
            steps = self.host.engine_steps()
            if steps == published_steps and time.monotonic() - published_at < HEARTBEAT_S:
                continue
            try:
                self._publish()
                published_steps, published_at = steps, time.monotonic()
            except Exception as e:  # a worker being replaced: try again next period
                log.warning("could not publish this replica's snapshot (%s); retrying", e)
