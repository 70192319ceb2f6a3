"""Where the engine deployment's replicas publish their counters, so that any of them can answer for all.

A client's request reaches one replica, so a replica cannot answer for the others by itself.
Each replica publishes a snapshot to the ReplicaRegistry, a deployment-scoped actor (shared by
the deployment's replicas and gone with it): every few seconds while it works, at once when a
view is asked of it, and for the last time when it stops. cluster.serve.fleet adds them up.
Light on purpose: the registry's process imports this module only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

REGISTRY_ACTOR = "replica_registry"  # the name in the engine deployment's deployment_actors
# A serving replica publishes at least this often; one silent for STALE_S has died without saying so.
HEARTBEAT_S = 10.0
STALE_S = 3 * HEARTBEAT_S
# A replica gone this long is folded into one "retired" snapshot: its counters stay in the totals, and
# a deployment that replaces replicas for weeks keeps a registry of the replicas it runs, not all it ran.
FORGET_S = 3600.0
RETIRED = "retired"
# Engine stats that count since start: summed over every replica, gone ones included (cluster.serve.fleet).
COUNTERS = ("steps", "preemptions", "prefix_cache_queried_tokens", "prefix_cache_hit_tokens")


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
    """The latest snapshot of each replica, by replica id, and the sum of those gone for FORGET_S."""

    def __init__(self) -> None:
        self.snapshots: dict[str, ReplicaSnapshot] = {}
        self.retired: ReplicaSnapshot | None = None

    def publish(self, snapshot: ReplicaSnapshot) -> None:
        snapshot.published = time.time()  # this actor's clock, so staleness never compares two nodes' clocks
        self.snapshots[snapshot.replica] = snapshot

    def all(self) -> list[ReplicaSnapshot]:
        now = time.time()
        for s in list(self.snapshots.values()):
            s.serving = s.serving and now - s.published < STALE_S
            if not s.serving and now - s.published > FORGET_S:
                self.retired = retire(s, into=self.retired)
                del self.snapshots[s.replica]
        every = list(self.snapshots.values()) + ([self.retired] if self.retired else [])
        return sorted(every, key=lambda s: s.replica)


def retire(gone: ReplicaSnapshot, *, into: ReplicaSnapshot | None) -> ReplicaSnapshot:
    """The retired total with `gone`'s counters added: expert load, per-worker counts, engine counters,
    and how many replicas it sums (stats["replicas"])."""
    stats = {key: gone.stats.get(key, 0) for key in COUNTERS} | {"replicas": 1}
    if into is None:
        return ReplicaSnapshot(RETIRED, False, gone.load, gone.workers, stats, [])
    workers = summed_workers([into.workers, gone.workers])
    return ReplicaSnapshot(RETIRED, False, added(into.load, gone.load), workers, added(into.stats, stats), [])


WORKER_COUNTS = ("tokens", "calls", "forward_ms", "bytes_in", "bytes_out")  # per worker row, since start


def summed_workers(rows: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Several replicas' per-worker rows summed by worker index (the experts named are the first row's)."""
    by_worker: dict[int, dict[str, Any]] = {}
    for replica_rows in rows:
        for w in replica_rows:
            total = by_worker.setdefault(
                w["worker"], {"worker": w["worker"], "experts": w["experts"]} | {key: 0 for key in WORKER_COUNTS}
            )
            for key in WORKER_COUNTS:
                total[key] += w[key]
    return [by_worker[w] for w in sorted(by_worker)]


KEPT = ("top_k",)  # what names a counter rather than counts


def added(a: Any, b: Any) -> Any:
    """Two counters of one shape added: numbers summed, lists element by element, dicts key by key."""
    if isinstance(a, dict):
        return {k: a[k] if k in KEPT else added(a[k], b[k]) for k in a}
    if isinstance(a, list):
        return [added(x, y) for x, y in zip(a, b)]
    return a + b
