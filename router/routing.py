"""[Router]: gate logits -> a plan that says which tokens each expert gets and with what weight.

Legend: T = tokens in the step, E = experts, A = activated experts per token (top-k), D = hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingPlan:
    topk_ids: torch.Tensor  # [T, A] chosen experts per token
    topk_weights: torch.Tensor  # [T, A] float32, renormalised to sum to 1 per token
    token_index: torch.Tensor  # [T*A] token of each (token, expert) pair, sorted by expert
    pair_weight: torch.Tensor  # [T*A] routing weight of each sorted pair
    unsort: torch.Tensor  # [T*A] where pair (t, a) of topk_ids.flatten() is in the sorted order
    counts: list[int]  # [E] tokens sent to each expert
    entropy_sum: float  # sum over tokens of the router's entropy, -sum_e p_e log p_e (nats)

    def expert_slices(self) -> list[tuple[int, int, int]]:
        """(expert, start, stop) into the expert-sorted pairs, for busy experts only."""
        slices, start = [], 0
        for expert, count in enumerate(self.counts):
            if count:
                slices.append((expert, start, start + count))
            start += count
        return slices


def route(router_logits: torch.Tensor, top_k: int) -> RoutingPlan:
    """Mixtral routing: softmax over all E experts, keep the top-k, renormalise.  logits [T, E]."""
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # [T, A]
    topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    flat_ids = topk_ids.flatten()  # [T*A]
    order = torch.argsort(flat_ids, stable=True)  # pairs grouped by expert, token order kept within
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
    return RoutingPlan(
        topk_ids=topk_ids,
        topk_weights=topk_weights,
        token_index=order // top_k,
        pair_weight=topk_weights.flatten()[order],
        unsort=torch.argsort(order),
        counts=counts,
        entropy_sum=float(entropy),
    )
