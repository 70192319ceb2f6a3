"""Replica autoscaling on what predicts an LLM engine's latency, read by Serve's autoscaler.

Ongoing requests say little about an engine that batches: 64 running decodes cost one step each,
and what hurts is a queue that waits for room. So a replica's load is the larger of the sequences
that want to run, (running + waiting) / max_num_seqs, and the fraction of its KV cache in use.
Serve asks for the sum of the loads over target_load replicas; its own upscale and downscale
delays and the min/max bounds apply on top (ray.serve.autoscaling_policy). Each replica records
these numbers in EngineServer.record_autoscaling_stats.

A replica takes a while to come up (a GPU node to start, its experts to load), and meanwhile its
load is still on the others, dipping as requests finish and arrive. So while a scale-up is still
starting (fewer running replicas than the target, for at most startup_s: ServeArgs.replica_startup_s),
the policy never asks for
fewer than the target: a dip would otherwise cancel the new replica, and its node, halfway.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.config import AutoscalingContext


def replica_load(running: float, waiting: float, max_num_seqs: float, kv_cache_usage: float) -> float:
    """1.0 is a replica exactly full: every running slot taken, or every KV block."""
    return max((running + waiting) / max_num_seqs, kv_cache_usage)


class EngineLoadPolicy:
    """Serve's policy_function (a class: Serve makes one per deployment with policy_kwargs)."""

    def __init__(self, target_load: float = 0.75, startup_s: float = 600.0) -> None:
        if not 0 < target_load <= 1:
            raise ValueError(f"target_load must be in (0, 1]; got {target_load}")
        self.target_load, self.startup_s = target_load, startup_s

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        loads = replica_loads(ctx.aggregated_metrics or {})
        if not loads:  # no replica has reported yet (starting up): hold
            return ctx.target_num_replicas, ctx.policy_state
        desired = sum(loads.values()) / self.target_load
        if self.scaling_up(ctx):
            desired = max(desired, ctx.target_num_replicas)
        return desired, ctx.policy_state

    def scaling_up(self, ctx: AutoscalingContext) -> bool:
        """Replicas asked for are still starting, and not for longer than startup_s."""
        now, since = ctx.current_time or time.time(), ctx.last_scale_up_time
        starting = ctx.current_num_replicas < ctx.target_num_replicas
        return starting and since is not None and now - since < self.startup_s


def replica_loads(metrics: dict[str, dict[Any, float]]) -> dict[Any, float]:
    """Per replica that reported all four numbers, its load."""
    keys = ("running", "waiting", "max_num_seqs", "kv_cache_usage")
    if not all(k in metrics for k in keys):
        return {}
    replicas = set.intersection(*(set(metrics[k]) for k in keys))
    return {r: replica_load(*(metrics[k][r] for k in keys)) for r in replicas if metrics["max_num_seqs"][r] > 0}
