"""Who watches the routing: load counts, traces and metrics hang off the data path here.

The MoE layer tells one RoutingObserver what each layer call routed and how long its round trip
took; RoutingObservers fans that out, so the coordinator's forward carries no bookkeeping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from router.routing import RoutingPlan

log = logging.getLogger(__name__)


class RoutingObserver(Protocol):
    def layer_routed(self, layer: int, plan: RoutingPlan, seconds: float) -> None:
        """One MoE layer call finished: its plan, and dispatch to combine in seconds."""
        ...

    def step_done(self) -> None:
        """Every layer of one engine step has run."""
        ...


class RoutingObservers:
    """Fans out to several observers. Watching must never stop the serving: an observer that
    raises (a trace on a full disk) is logged and dropped, and the step goes on."""

    def __init__(self, observers: Sequence[RoutingObserver]) -> None:
        self.observers = list(observers)

    def layer_routed(self, layer: int, plan: RoutingPlan, seconds: float) -> None:
        for observer in list(self.observers):
            self._guarded(observer, lambda o: o.layer_routed(layer, plan, seconds))

    def step_done(self) -> None:
        for observer in list(self.observers):
            self._guarded(observer, lambda o: o.step_done())

    def _guarded(self, observer: RoutingObserver, call: Callable[[RoutingObserver], None]) -> None:
        try:
            call(observer)
        except Exception:
            log.exception("routing observer %r failed; it is dropped", observer)
            self.observers.remove(observer)
