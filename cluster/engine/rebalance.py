"""Rebalancing from live load: a new expert map from the measured window, applied while serving.

    window    = tokens per expert (all layers) and rows per worker since the last rebalance
    new map   = balanced_map(window load, same workers, each its slots, same copies)   # router.expert_map
                (CPU workers keep their experts: a hot expert belongs where compute is fast)
    load      = each worker reads the experts it gains          # while the old map serves
    switch    = moe.expert_map = new                         # takes effect at the next step
    drop      = once no step runs on the old map, workers let go of what they lost

A step runs on one map from start to end, so no request is lost or changed by the switch (its
tokens are computed by the same experts, on other workers). A worker that is asked for an expert
it does not hold loads it first (workers.expert_worker), so even a worker restarted with its
original experts mid-switch answers, and the worker's supervisor (cluster.supervisor) hands a restarted
worker its experts under the current map before the transport sends it anything again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.errors import UserError
from router.expert_map import ExpertMap, ExpertMapError, balanced_map, worker_loads
from router.load import balancedness
from router.moe_block import MoEBlock
from workers.telemetry import Telemetry

# experts per worker -> apply to every worker at once (Ray calls in parallel, or in-process calls)
WorkerCall = Callable[[dict[int, list[int]]], None]
# experts per worker, for every worker: what a worker restarted from now on must hold
SetHoldings = Callable[[Sequence[Sequence[int]]], None]
SWITCH_WAIT_S = 600.0  # a step longer than this on the old map: drop anyway (a worker reloads on demand)


@dataclass(frozen=True)
class Rebalance:
    before: float  # balancedness of rows per worker measured over the window, on the old map
    predicted: float  # the window's expert load spread over the new map
    window_tokens: int  # routed (token, expert) pairs in the window, over all layers
    expert_map: ExpertMap
    loaded: dict[int, list[int]]  # worker -> experts it read for the new map
    dropped: dict[int, list[int]]  # worker -> experts it let go
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "balancedness_before": self.before,
            "balancedness_predicted": self.predicted,
            "window_tokens": self.window_tokens,
            "expert_map": self.expert_map.to_json(),
            "loaded": {str(w): e for w, e in self.loaded.items()},
            "dropped": {str(w): e for w, e in self.dropped.items()},
            "seconds": self.seconds,
            "changed": bool(self.loaded or self.dropped),
        }


# A worker's share of a rebalance: reading its new experts from the checkpoint (GBs on a real model).
WORKER_CALL_TIMEOUT_S = 600.0


def ray_calls(workers: Sequence[Any], method: str, *, timeout_s: float = WORKER_CALL_TIMEOUT_S) -> WorkerCall:
    """Call `method(experts)` on each named worker actor at once, and wait for all of them, at most
    `timeout_s`: a worker that hangs fails the rebalance (the old map stays), never holds it forever."""

    def call(experts: dict[int, list[int]]) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            ray.get([getattr(workers[w], method).remote(e) for w, e in experts.items()], timeout=timeout_s)
        except GetTimeoutError:
            raise TimeoutError(f"workers {sorted(experts)} did not finish {method} within {timeout_s:g} s") from None

    return call


def local_calls(workers: Sequence[Any], method: str) -> WorkerCall:
    def call(experts: dict[int, list[int]]) -> None:
        for w, e in experts.items():
            getattr(workers[w], method)(e)

    return call


class Rebalancer:
    def __init__(
        self,
        moe: MoEBlock,
        *,
        load_experts: WorkerCall,
        hold_only: WorkerCall,
        set_holdings: SetHoldings,
        telemetry: Telemetry,
    ) -> None:
        """`set_holdings` tells whoever restarts workers (cluster.supervisor) what each must hold from now on."""
        self.moe = moe
        self.load_experts, self.hold_only = load_experts, hold_only
        self.set_holdings = set_holdings
        self.telemetry = telemetry
        self._lock = threading.Lock()  # one rebalance at a time
        self._mark_experts = self._per_expert()
        moe.worker_load.mark()

    def _per_expert(self) -> list[int]:
        return [sum(col) for col in zip(*self.moe.load.snapshot())]

    def window(self) -> tuple[list[int], list[int]]:
        """(tokens per expert over all layers, rows per worker) since the last rebalance."""
        experts = [a - b for a, b in zip(self._per_expert(), self._mark_experts)]
        return experts, self.moe.worker_load.window()

    def rebalance(self, *, max_experts_per_worker: int | None = None, copies: int | None = None) -> Rebalance:
        """Compute a map from the window's load and apply it live. By default each worker keeps its
        number of experts (what its memory was sized for) and the copies in all stay as many; the
        arguments widen that (tests and operators in-process; the HTTP route takes neither)."""
        with self._lock:
            start = time.perf_counter()
            old = self.moe.expert_map
            experts, rows = self.window()
            if not sum(experts):
                raise UserError("no tokens were routed since the last rebalance; send traffic first, then rebalance")
            try:
                new = rebalanced(old, experts, max_experts_per_worker=max_experts_per_worker, copies=copies)
            except ExpertMapError as e:
                raise UserError(str(e)) from None
            before = balancedness(rows)
            predicted, current = (balancedness(worker_loads(m, experts)) for m in (new, old))
            if predicted <= current:  # nothing better for this load: keep the map, and the weights where they are
                new, predicted = old, current
            gained = {w: sorted(set(n) - set(o)) for w, (o, n) in enumerate(zip(old.workers, new.workers)) if set(n) - set(o)}
            lost = {w: sorted(set(o) - set(n)) for w, (o, n) in enumerate(zip(old.workers, new.workers)) if set(o) - set(n)}
            if gained:
                try:
                    self.load_experts(gained)  # the old map serves meanwhile
                except BaseException:
                    self.hold_only({w: list(old.workers[w]) for w in gained})  # as they were: nothing half-applied
                    raise
            self.set_holdings(new.workers)  # what a worker restarted from now on must hold
            self.moe.expert_map = new  # the next step runs on it
            self._wait_off(old)
            if lost:
                self.hold_only({w: list(new.workers[w]) for w in lost})
            self._mark_experts = self._per_expert()
            self.moe.worker_load.mark()
            self.telemetry.set("moe_rebalance_balancedness_before", before)
            self.telemetry.set("moe_rebalance_balancedness_predicted", predicted)
            self.telemetry.inc("moe_rebalances")
            return Rebalance(before, predicted, sum(experts), new, gained, lost, time.perf_counter() - start)

    def _wait_off(self, old: ExpertMap) -> None:
        """Until no step runs on `old` (the step in flight at the switch has finished)."""
        deadline = time.monotonic() + SWITCH_WAIT_S
        while self.moe.step_map is old and self.moe.expert_map is not old and time.monotonic() < deadline:
            time.sleep(0.01)


def rebalanced(
    old: ExpertMap, expert_load: Sequence[float], *, max_experts_per_worker: int | None = None, copies: int | None = None
) -> ExpertMap:
    """`old` rebalanced for this load over its GPU (and auto) workers, each within its slots; CPU
    workers and the experts only they hold stay as they are."""
    movable = [w for w, kind in enumerate(old.kinds) if kind != "cpu"]
    experts = sorted({e for w in movable for e in old.workers[w]})
    slots = [max_experts_per_worker or len(old.workers[w]) for w in movable]
    part = balanced_map(
        [expert_load[e] for e in experts],
        kinds=[old.kinds[w] for w in movable],
        slots_per_worker=slots,
        copies=copies or sum(len(old.workers[w]) for w in movable),
    )
    workers = list(old.workers)
    for i, w in enumerate(movable):
        workers[w] = tuple(experts[j] for j in part.workers[i])
    return ExpertMap(old.num_experts, tuple(workers), old.kinds)
