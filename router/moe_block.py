"""Mixtral's feed-forward as a part of the model (mixtral.feed_forward.FeedForward): the router and
the MoE layer over the expert workers, with what watches them.

    start   plan = route(gate_l(m), k); send each busy worker its tokens     (router.moe.start_moe)
    finish  wait for the workers, combine, tell the observers                 (router.moe.finish_moe)

It holds what only an MoE model has: the transport to the workers, the expert map (a new one,
from rebalancing, takes effect at the next step, never within one), the routing load per expert
and per worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from mixtral import names
from mixtral.step_clock import StepClock
from router.expert_map import ExpertMap
from router.load import ExpertLoad, WorkerLoad
from router.moe import MoeCall, combine_call, start_moe
from router.observer import RoutingObserver, RoutingObservers
from router.routing import route
from router.transport import ExpertTransport


class MoEBlock:
    overlaps = True  # the experts work on other processes while the runner runs the other micro-batch

    def __init__(
        self,
        gates: list[torch.Tensor],
        top_k: int,
        transport: ExpertTransport,
        *,
        load: ExpertLoad,
        observers: Sequence[RoutingObserver] = (),
        expert_map: ExpertMap,
        worker_load: WorkerLoad,
        clock: StepClock | None = None,
    ) -> None:
        self.gates = gates  # per layer: the router [E, D]
        self.top_k = top_k
        self.transport = transport
        self.load = load
        self.observer = RoutingObservers([load, *observers])  # load first: the others may read its totals
        self.expert_map = expert_map
        self.step_map: ExpertMap | None = None  # the map of the step running now, if one is
        self.worker_load = worker_load
        self.clock = clock or StepClock()  # dispatch, wait, combine (mixtral.step_clock)

    @staticmethod
    def gates_of(weights: dict[str, torch.Tensor], num_layers: int) -> list[torch.Tensor]:
        """Each layer's router, taken out of the coordinator's weights."""
        return [weights.pop(names.layer_weight(layer, names.GATE)) for layer in range(num_layers)]

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        self.step_map = self.expert_map  # one map for the whole step
        try:
            yield
        except BaseException:
            self.transport.abandon()  # nothing of this step may be sent again or taken for a later one's
            raise
        finally:
            self.step_map = None
        self.observer.step_done()

    def start(self, layer: int, x: torch.Tensor) -> MoeCall:
        assert self.step_map is not None, "MoE layers run within step()"
        with self.clock.timing("dispatch"):
            plan = route(F.linear(x, self.gates[layer]), self.top_k)  # gate logits [T, E]
            call = start_moe(layer, x, plan, self.transport, self.step_map)
            self.worker_load.record(call.worker_rows())
        return call

    def finish(self, pending: MoeCall) -> torch.Tensor:
        """router.moe.finish_moe, its waiting and its combining timed apart."""
        with self.clock.timing("wait"):
            outputs = self.transport.gather(pending.pending)
        with self.clock.timing("combine"):
            return combine_call(pending, outputs, self.observer)
