"""Where the engine deployment's replicas publish their counters, so that any of them can answer for all.

A client's request reaches one replica, so a replica cannot answer for the others by itself.
Each replica publishes a snapshot to the ReplicaRegistry, a deployment-scoped actor (shared by
the deployment's replicas and gone with it): every few seconds while it works, at once when a
view is asked of it, and for the last time when it stops. cluster.serve.fleet adds them up.
Light on purpose: the registry's process imports this module only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

REGISTRY_ACTOR = "replica_registry"  # the name in the engine deployment's deployment_actors
# A serving replica publishes at least this often; one silent for STALE_S has died without saying so.
HEARTBEAT_S = 10.0
STALE_S = 3 * HEARTBEAT_S


@dataclass
class ReplicaSnapshot:
    replica: str
    serving: bool  # False once the replica has stopped; its counters stay in the totals
    load: dict[str, Any]  # ExpertLoad.counters()
    workers: list[dict[str, Any]]  # per expert worker: expert, calls, forward_ms, bytes_in, bytes_out
    stats: dict[str, Any]  # EngineHost.own_stats
    families: list[dict[str, Any]]  # workers.telemetry.local_families()
    published: float = field(default_factory=time.time)


class ReplicaRegistry:
    """The latest snapshot of each replica, by replica id."""

    def __init__(self) -> None:
        self.snapshots: dict[str, ReplicaSnapshot] = {}

    def publish(self, snapshot: ReplicaSnapshot) -> None:
        snapshot.published = time.time()  # this actor's clock, so staleness never compares two nodes' clocks
        self.snapshots[snapshot.replica] = snapshot

    def all(self) -> list[ReplicaSnapshot]:
        now = time.time()
        for s in self.snapshots.values():
            s.serving = s.serving and now - s.published < STALE_S
        return sorted(self.snapshots.values(), key=lambda s: s.replica)
