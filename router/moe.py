"""One MoE layer over a transport: route, dispatch, run experts in parallel, combine.

    [Router]   plan = route(gate(x), k)                  # top-k of softmax, renormalised
    [Dispatch] x_e = x[tokens of expert e]               # only busy experts, one call each
    [Experts]  y_e = w2(silu(w1 x_e) * w3 x_e)           # on worker e, all at once
    [Combine]  out[t] = sum_e weight[t, e] * y_e[t]      # back in token order

Legend: T = tokens, D = hidden, A = top-k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from router.observer import RoutingObserver
from router.routing import RoutingPlan
from router.transport import ExpertTransport


def dispatch(plan: RoutingPlan, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per busy expert, its tokens [T_e, D] in a tensor of its own.

    Each expert's gather is its own allocation, not a slice of one sorted buffer, because a
    pickled view carries its whole storage: a slice would ship every token to every worker.
    """
    return {e: x[plan.token_index[start:stop]] for e, start, stop in plan.expert_slices()}


def combine(plan: RoutingPlan, outputs: dict[int, torch.Tensor], *, num_tokens: int) -> torch.Tensor:
    """Weighted sum of expert outputs, scattered back to token order.  -> [T, D]"""
    parts = [outputs[e] for e, _, _ in plan.expert_slices()]
    sorted_y = torch.cat(parts, dim=0)  # [T*A, D], expert-sorted like plan.token_index
    # Weights stay float32 (as the router computed them) and the product is cast back.
    weighted = (sorted_y.float() * plan.pair_weight[:, None]).to(sorted_y.dtype)
    out = torch.zeros(num_tokens, sorted_y.shape[-1], dtype=sorted_y.dtype, device=sorted_y.device)
    return out.index_add_(0, plan.token_index, weighted)


@dataclass(frozen=True)
class MoeCall:
    """One MoE layer in flight: its plan, the transport's pending calls, and when it started."""

    layer: int
    plan: RoutingPlan
    pending: Any
    num_tokens: int
    started: float


def start_moe(layer: int, x: torch.Tensor, plan: RoutingPlan, transport: ExpertTransport) -> MoeCall:
    """[Dispatch]: send each busy expert its tokens, not waiting for the replies."""
    return MoeCall(layer, plan, transport.submit(layer, dispatch(plan, x)), x.shape[0], time.perf_counter())


def finish_moe(call: MoeCall, transport: ExpertTransport, observer: RoutingObserver | None = None) -> torch.Tensor:
    """Wait for the experts, [Combine], and tell the observer what was routed and how long it took."""
    out = combine(call.plan, transport.gather(call.pending), num_tokens=call.num_tokens)
    if observer is not None:
        observer.layer_routed(call.layer, call.plan, time.perf_counter() - call.started)
    return out


def moe_layer(layer: int, x: torch.Tensor, plan: RoutingPlan, transport: ExpertTransport) -> torch.Tensor:
    return finish_moe(start_moe(layer, x, plan, transport), transport)
