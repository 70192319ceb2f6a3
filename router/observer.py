"""Who watches the routing: load counts, traces and metrics hang off the data path here.

The MoE layer tells one RoutingObserver what each layer call routed and how long its round trip
took; RoutingObservers fans that out, so the coordinator's forward carries no bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from router.routing import RoutingPlan


class RoutingObserver(Protocol):
    def layer_routed(self, layer: int, plan: RoutingPlan, seconds: float) -> None:
        """One MoE layer call finished: its plan, and dispatch to combine in seconds."""
        ...

    def step_done(self) -> None:
        """Every layer of one engine step has run."""
        ...


class RoutingObservers:
    def __init__(self, observers: Sequence[RoutingObserver]) -> None:
        self.observers = list(observers)

    def layer_routed(self, layer: int, plan: RoutingPlan, seconds: float) -> None:
        for observer in self.observers:
            observer.layer_routed(layer, plan, seconds)

    def step_done(self) -> None:
        for observer in self.observers:
            observer.step_done()
