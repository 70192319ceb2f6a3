"""Prometheus metrics through Ray's metrics export (ray.util.metrics), with a model label, and
the same series kept in this process (prometheus_client) for the serving port's /metrics.

Ray exports each series with its own `ray_` prefix, so `moe_expert_tokens` is scraped as
`ray_moe_expert_tokens_total`. Outside a Ray worker the Ray half is a no-op, so the same model
code runs in tests and benchmarks without a Ray runtime. Used by the expert workers and the
coordinator; a Serve replica publishes its process's series (local_families) to the replica
registry, and /metrics on the HTTP port renders every replica's with a replica label.
"""

from __future__ import annotations

import threading
from typing import Any

import prometheus_client

# Seconds: from 1 ms to 60 s, for latencies from one decode step to a whole request.
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]

SPECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # name: (kind, description, tag keys besides "model")
    "moe_expert_tokens": ("counter", "Tokens routed to an expert in a layer.", ("layer", "expert")),
    "moe_expert_balancedness": ("gauge", "Mean over max tokens per expert in a layer, since start.", ("layer",)),
    "moe_router_entropy": ("gauge", "Mean router entropy per token in a layer, nats, since start.", ("layer",)),
    "moe_dispatch_round_trip_seconds": ("histogram", "Dispatch to combine of one MoE layer.", ("layer",)),
    "moe_worker_forward_seconds": ("histogram", "One layer call on an expert worker.", ("worker",)),
    "moe_worker_bytes_in": ("counter", "Activation bytes received by a worker.", ("worker",)),
    "moe_worker_bytes_out": ("counter", "Activation bytes sent back by a worker.", ("worker",)),
    "moe_worker_balancedness": ("gauge", "Mean over max rows per expert worker, since the last rebalance.", ()),
    "moe_rebalance_balancedness_before": ("gauge", "Worker balancedness measured before the last rebalance.", ()),
    "moe_rebalance_balancedness_predicted": ("gauge", "The last rebalance's window load spread over its new map.", ()),
    "moe_rebalances": ("counter", "Expert maps recomputed from live load and applied.", ()),
    "moe_num_requests_running": ("gauge", "Sequences in the running batch.", ()),
    "moe_num_requests_waiting": ("gauge", "Requests waiting to be admitted.", ()),
    "moe_kv_cache_usage_perc": ("gauge", "Fraction of KV cache blocks held by sequences (0 to 1).", ()),
    "moe_kv_cache_free_blocks": ("gauge", "KV cache blocks free, cached prefixes included.", ()),
    "moe_num_preemptions": ("counter", "Sequences preempted for KV blocks (recomputed later).", ()),
    "moe_prefix_cache_queries": ("counter", "Prompt tokens looked up in the prefix cache.", ()),
    "moe_prefix_cache_hits": ("counter", "Prompt tokens found in the prefix cache.", ()),
    "moe_time_to_first_token_seconds": ("histogram", "Request arrival to its first token.", ()),
    "moe_inter_token_latency_seconds": ("histogram", "Between consecutive tokens of a request.", ()),
    "moe_e2e_request_latency_seconds": ("histogram", "Request arrival to its last token.", ()),
    "moe_prompt_tokens": ("counter", "Prompt tokens of finished requests.", ()),
    "moe_generation_tokens": ("counter", "Generated tokens.", ()),
}


class Telemetry:
    def __init__(self, model: str) -> None:
        self.model = model
        self._metrics: dict[str, Any] | None = None

    def _get(self, name: str) -> Any | None:
        if self._metrics is None:
            self._metrics = _create() if _in_ray() else {}
        return self._metrics.get(name)

    def inc(self, name: str, value: float = 1.0, **tags: object) -> None:
        if value:
            labels = self._tags(tags)
            _local(name).labels(**labels).inc(value)
            if (metric := self._get(name)) is not None:
                metric.inc(value, tags=labels)

    def set(self, name: str, value: float, **tags: object) -> None:
        labels = self._tags(tags)
        _local(name).labels(**labels).set(value)
        if (metric := self._get(name)) is not None:
            metric.set(value, tags=labels)

    def observe(self, name: str, value: float, **tags: object) -> None:
        labels = self._tags(tags)
        _local(name).labels(**labels).observe(value)
        if (metric := self._get(name)) is not None:
            metric.observe(value, tags=labels)

    def _tags(self, tags: dict[str, object]) -> dict[str, str]:
        return {"model": self.model} | {k: str(v) for k, v in tags.items()}


def _in_ray() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False


def _create() -> dict[str, Any]:
    from ray.util.metrics import Counter, Gauge, Histogram

    metrics: dict[str, Any] = {}
    for name, (kind, description, tags) in SPECS.items():
        tag_keys = ("model", *tags)
        if kind == "counter":
            metrics[name] = Counter(name, description=description, tag_keys=tag_keys)
        elif kind == "gauge":
            metrics[name] = Gauge(name, description=description, tag_keys=tag_keys)
        else:
            metrics[name] = Histogram(name, description=description, boundaries=LATENCY_BUCKETS, tag_keys=tag_keys)
    return metrics


# This process's copy of every series, created on first use: one registry per process, because
# the coordinator's engine and its routing metrics each hold a Telemetry and add to the same series.
_LOCAL_REGISTRY = prometheus_client.CollectorRegistry(auto_describe=False)
_LOCAL: dict[str, Any] = {}
_LOCAL_LOCK = threading.Lock()


def _local(name: str) -> Any:
    if name in _LOCAL:
        return _LOCAL[name]
    with _LOCAL_LOCK:  # the engine loop and a request's thread may both meet a series first
        return _create_local(name)


def _create_local(name: str) -> Any:
    if name not in _LOCAL:
        kind, description, tags = SPECS[name]
        labels = ("model", *tags)
        if kind == "counter":
            _LOCAL[name] = prometheus_client.Counter(name, description, labels, registry=_LOCAL_REGISTRY)
        elif kind == "gauge":
            _LOCAL[name] = prometheus_client.Gauge(name, description, labels, registry=_LOCAL_REGISTRY)
        else:
            _LOCAL[name] = prometheus_client.Histogram(
                name, description, labels, buckets=LATENCY_BUCKETS, registry=_LOCAL_REGISTRY
            )
    return _LOCAL[name]


def local_families() -> list[dict[str, Any]]:
    """This process's series as plain data: [{name, type, documentation, samples: [[name, labels, value]]}]."""
    return [
        {
            "name": family.name,
            "type": family.type,
            "documentation": family.documentation,
            "samples": [[s.name, dict(s.labels), s.value] for s in family.samples if not s.name.endswith("_created")],
        }
        for family in _LOCAL_REGISTRY.collect()
    ]
