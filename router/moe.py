"""One MoE layer over a transport: route, dispatch, run experts in parallel, combine.

    [Router]   plan = route(gate(x), k)                  # top-k of softmax, renormalised
    [Map]      pieces of each expert's tokens            # split evenly over the workers holding it
    [Dispatch] x_w = x[tokens of worker w's pieces]      # only busy workers, one call each
    [Experts]  y_e = w2(silu(w1 x_e) * w3 x_e)           # on the workers, all at once
    [Combine]  out[t] = sum_e weight[t, e] * y_e[t]      # back in token order

Legend: T = tokens, D = hidden, A = top-k.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from router.expert_map import ExpertMap
from router.observer import RoutingObserver
from router.routing import RoutingPlan
from router.transport import ExpertTransport, WorkerBatch
from router.wire import Segment


@dataclass(frozen=True)
class Piece:
    """Pairs [start, stop) of the plan's expert-sorted order, for `expert`, computed on `worker`."""

    worker: int
    expert: int
    start: int
    stop: int


def pieces(plan: RoutingPlan, expert_map: ExpertMap, layer: int) -> list[Piece]:
    """Each busy expert's pairs, cut into near-equal runs, one per copy (fewer when it has fewer pairs
    than copies). Which copy takes the first run turns with the layer and the expert, so copies share
    the remainders instead of the first one always taking them. In expert-sorted order."""
    copies = expert_map.copies
    out: list[Piece] = []
    for e, start, stop in plan.expert_slices():
        holders = copies[e]
        parts = min(len(holders), stop - start)
        bounds = [start + (stop - start) * i // parts for i in range(parts + 1)]
        out.extend(Piece(holders[(layer + e + i) % len(holders)], e, bounds[i], bounds[i + 1]) for i in range(parts))
    return out


def dispatch(plan: RoutingPlan, x: torch.Tensor, cuts: list[Piece]) -> dict[int, WorkerBatch]:
    """Per busy worker, its pieces' tokens [T_w, D] in a tensor of its own, and whose rows they are.

    Each worker's gather is its own allocation, not a slice of one sorted buffer, because a
    pickled view carries its whole storage: a slice would ship every token to every worker.
    """
    by_worker: dict[int, list[Piece]] = defaultdict(list)
    for piece in cuts:
        by_worker[piece.worker].append(piece)
    batches = {}
    for worker, mine in by_worker.items():
        index = (
            torch.cat([plan.token_index[p.start : p.stop] for p in mine])
            if len(mine) > 1
            else plan.token_index[mine[0].start : mine[0].stop]
        )
        batches[worker] = WorkerBatch(x[index], tuple(Segment(p.expert, p.stop - p.start) for p in mine))
    return batches


def combine(plan: RoutingPlan, cuts: list[Piece], outputs: dict[int, torch.Tensor], *, num_tokens: int) -> torch.Tensor:
    """Weighted sum of expert outputs, scattered back to token order.  -> [T, D]"""
    taken: dict[int, int] = defaultdict(int)  # rows of each worker's output laid out so far
    parts = []
    for p in cuts:  # in expert-sorted order, as each worker's rows are within its output
        rows = p.stop - p.start
        parts.append(outputs[p.worker][taken[p.worker] : taken[p.worker] + rows])
        taken[p.worker] += rows
    if any(outputs[w].shape[0] != rows for w, rows in taken.items()):
        raise RuntimeError(f"workers answered {[(w, outputs[w].shape[0]) for w in taken]} rows for {dict(taken)} sent")
    sorted_y = torch.cat(parts, dim=0)  # [T*A, D], expert-sorted like plan.token_index
    # Weights stay float32 (as the router computed them) and the product is cast back.
    weighted = (sorted_y.float() * plan.pair_weight[:, None]).to(sorted_y.dtype)
    # Back in token order by a gather and a sum over each token's A pairs, not a scatter-add into
    # zeros: torch's CPU index_add_ opens a parallel region even for one token, and waking the
    # coordinator's thread team after the workers' turn cost more than the rest of the combine
    # (docs/performance.md). Each token's sum is rounded once, as index_add_'s into zeros is for A = 2.
    return weighted.index_select(0, plan.unsort).view(num_tokens, plan.topk_ids.shape[1], -1).sum(dim=1)


@dataclass(frozen=True)
class MoeCall:
    """One MoE layer in flight: its plan and pieces, the transport's pending calls, and when it started."""

    layer: int
    plan: RoutingPlan
    pieces: list[Piece]
    pending: Any
    num_tokens: int
    started: float

    def worker_rows(self) -> dict[int, int]:
        rows: dict[int, int] = defaultdict(int)
        for p in self.pieces:
            rows[p.worker] += p.stop - p.start
        return rows


def start_moe(layer: int, x: torch.Tensor, plan: RoutingPlan, transport: ExpertTransport, expert_map: ExpertMap) -> MoeCall:
    """[Map] and [Dispatch]: send each busy worker its tokens, not waiting for the replies."""
    cuts = pieces(plan, expert_map, layer)
    return MoeCall(layer, plan, cuts, transport.submit(layer, dispatch(plan, x, cuts)), x.shape[0], time.perf_counter())


def finish_moe(call: MoeCall, transport: ExpertTransport, observer: RoutingObserver | None = None) -> torch.Tensor:
    """Wait for the workers, [Combine], and tell the observer what was routed and how long it took."""
    return combine_call(call, transport.gather(call.pending), observer)


def combine_call(call: MoeCall, outputs: dict[int, torch.Tensor], observer: RoutingObserver | None = None) -> torch.Tensor:
    """[Combine] the workers' answers to `call`, and tell the observer what was routed and how long it took."""
    out = combine(call.plan, call.pieces, outputs, num_tokens=call.num_tokens)
    if observer is not None:
        observer.layer_routed(call.layer, call.plan, time.perf_counter() - call.started)
    return out


def moe_layer(layer: int, x: torch.Tensor, plan: RoutingPlan, transport: ExpertTransport, expert_map: ExpertMap) -> torch.Tensor:
    return finish_moe(start_moe(layer, x, plan, transport, expert_map), transport)
