"""Prometheus series of the routing, fed by the coordinator's routing observer."""

from __future__ import annotations

from router.load import ExpertLoad, WorkerLoad, balancedness
from router.routing import RoutingPlan
from workers.telemetry import Telemetry


class RoutingMetrics:
    """Per layer: tokens per expert, the round trip, and the load's balancedness and entropy so far;
    per step: the balancedness of rows per worker since the last rebalance."""

    def __init__(self, telemetry: Telemetry, load: ExpertLoad, worker_load: WorkerLoad) -> None:
        self.telemetry = telemetry
        self.load = load  # the totals since start, recorded before this observer is called
        self.worker_load = worker_load

    def layer_routed(self, layer: int, plan: RoutingPlan, seconds: float) -> None:
        t, load = self.telemetry, self.load
        for expert, count in enumerate(plan.counts):
            t.inc("moe_expert_tokens", count, layer=layer, expert=expert)
        t.observe("moe_dispatch_round_trip_seconds", seconds, layer=layer)
        t.set("moe_expert_balancedness", balancedness(load.total[layer]), layer=layer)
        t.set("moe_router_entropy", load.entropy_sum[layer] / max(1, load.tokens[layer]), layer=layer)

    def step_done(self) -> None:
        self.telemetry.set("moe_worker_balancedness", balancedness(self.worker_load.window()))
