"""One view over every replica of an engine deployment: expert load, engine stats and Prometheus series
(and the series of several models' deployments as one text).

Built from the replicas' snapshots (cluster.serve.replica_registry): counters summed over every
replica the registry has heard from (a stopped one's tokens were still served), gauges over the
replicas serving now, and a per-replica breakdown beside them. The registry lives as long as the
deployment's version: a redeploy with new code, or Serve recreating a failed registry, starts the
sums again from the replicas then running.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from cluster.serve.replica_registry import COUNTERS, ReplicaSnapshot, summed_workers
from router.load import ExpertLoad

GAUGES = ("running", "waiting", "kv_blocks", "kv_blocks_free", "kv_cache_bytes", "resident_bytes")


def fleet_load(snapshots: list[ReplicaSnapshot]) -> dict[str, Any]:
    """ExpertLoad.report over every replica, workers summed per worker index, and each replica's own counts."""
    replicas = [{"replica": s.replica, "serving": s.serving, "tokens": s.load["tokens"], "workers": s.workers} for s in snapshots]
    return ExpertLoad.summed([s.load for s in snapshots]).report() | {
        "workers": summed_workers(s.workers for s in snapshots),
        "replicas": replicas,
    }


def fleet_stats(snapshots: list[ReplicaSnapshot]) -> dict[str, Any]:
    """Counters summed over every replica, gauges over the serving ones, and each replica's own stats."""
    serving = [s for s in snapshots if s.serving]
    out: dict[str, Any] = {key: sum(s.stats[key] for s in snapshots) for key in COUNTERS}
    out |= {key: sum(s.stats[key] for s in serving) for key in GAUGES}
    out["kv_cache_usage"] = 1.0 - out["kv_blocks_free"] / out["kv_blocks"] if out["kv_blocks"] else 0.0
    queried = out["prefix_cache_queried_tokens"]
    out["prefix_cache_hit_rate"] = out["prefix_cache_hit_tokens"] / queried if queried else 0.0
    out["num_replicas"] = len(serving)
    with_experts = [s for s in serving if "expert_half_rows" in s.stats]  # a dense model's replicas have no experts
    if with_experts:
        out["expert_compute_dtype"] = "/".join(sorted({str(s.stats.get("expert_compute_dtype")) for s in with_experts}))
        out["expert_half_rows"] = max(s.stats.get("expert_half_rows", 0) for s in with_experts)
        out["expert_packed_workers"] = sum(s.stats.get("expert_packed_workers", 0) for s in with_experts)
    out["replicas"] = [{"replica": s.replica, "serving": s.serving} | s.stats for s in snapshots]
    return out


def fleet_metrics(snapshots: list[ReplicaSnapshot]) -> bytes:
    """Prometheus text of every serving replica's series, each sample labelled with its replica."""
    families: dict[str, Metric] = {}
    for s in snapshots:
        if not s.serving:
            continue  # a stopped process's series end with it, as in any scrape
        for f in s.families:
            metric = families.setdefault(f["name"], Metric(f["name"], f["documentation"], f["type"]))
            for name, labels, value in f["samples"]:
                metric.add_sample(name, labels | {"replica": s.replica}, value)
    return exposition(families)


def merged_metrics(texts: list[bytes]) -> bytes:
    """Several models' Prometheus texts (fleet_metrics of each) as one: each family once, with every
    model's samples (their `model` label tells them apart)."""
    if len(texts) == 1:
        return texts[0]
    families: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type)).samples.extend(
                family.samples
            )
    return exposition(families)


def exposition(families: dict[str, Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
