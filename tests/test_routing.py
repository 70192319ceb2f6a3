"""Route + dispatch + combine against the token-by-token reference MoE, over a grid of shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral.layers import expert_ffn
from router.expert_map import ExpertMap
from router.moe import moe_layer
from router.routing import route
from router.transport import LocalTransport, WorkerBatch
from router.wire import Segment
from tests.reference import reference_moe

D, I = 32, 48


class ToyExpert:
    def __init__(self, expert: int, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> None:
        self.expert = expert
        self.w = (w1, w2, w3)

    def forward(self, layer: int, x: torch.Tensor, segments: tuple[Segment, ...] = ()) -> torch.Tensor:
        assert all(e == self.expert for e, _ in segments)
        return expert_ffn(x, *self.w)


class CountingTransport(LocalTransport):
    """The real local transport, recording which experts each layer call reached."""

    def __init__(self, experts: list[ToyExpert]) -> None:
        super().__init__(experts)
        self.calls: list[tuple[int, dict[int, int]]] = []

    def submit(self, layer: int, inputs: dict[int, WorkerBatch]) -> dict[int, torch.Tensor]:
        self.calls.append((layer, {w: b.x.shape[0] for w, b in inputs.items()}))
        return super().submit(layer, inputs)


def random_experts(
    num_experts: int, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(num_experts, D, generator=g)
    w1 = [torch.randn(I, D, generator=g) / D**0.5 for _ in range(num_experts)]
    w2 = [torch.randn(D, I, generator=g) / I**0.5 for _ in range(num_experts)]
    w3 = [torch.randn(I, D, generator=g) / D**0.5 for _ in range(num_experts)]
    return gate, w1, w2, w3


@pytest.mark.parametrize("num_experts,top_k", [(2, 1), (4, 1), (4, 2), (8, 2), (8, 3), (6, 6)])
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_moe_layer_matches_reference(num_experts: int, top_k: int, num_tokens: int) -> None:
    gate, w1, w2, w3 = random_experts(num_experts, seed=num_experts * 100 + top_k)
    x = torch.randn(num_tokens, D, generator=torch.Generator().manual_seed(num_tokens))
    transport = CountingTransport([ToyExpert(e, *w) for e, w in enumerate(zip(w1, w2, w3))])
    plan = route(F.linear(x, gate), top_k)
    out = moe_layer(0, x, plan, transport, ExpertMap.one_per_worker(num_experts))
    torch.testing.assert_close(out, reference_moe(x, gate, w1, w2, w3, top_k), rtol=1e-5, atol=1e-5)


def test_one_call_per_busy_expert_and_none_for_idle() -> None:
    gate, w1, w2, w3 = random_experts(8, seed=1)
    # Push every token towards experts 2 and 5 so most experts are idle.
    gate[[0, 1, 3, 4, 6, 7]] -= 100.0
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(3)).abs()
    transport = CountingTransport([ToyExpert(e, *w) for e, w in enumerate(zip(w1, w2, w3))])
    plan = route(F.linear(x, gate), 2)
    moe_layer(3, x, plan, transport, ExpertMap.one_per_worker(8))
    assert transport.calls == [(3, {2: 10, 5: 10})]
    assert plan.counts == [0, 0, 10, 0, 0, 10, 0, 0]


def test_routing_matches_transformers_router() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    config = MixtralConfig(hidden_size=D, num_local_experts=8, num_experts_per_tok=2)
    router = MixtralTopKRouter(config)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(33, D)
    with torch.no_grad():
        logits, scores, indices = router(x)
        plan = route(F.linear(x, router.weight), 2)
    assert torch.equal(plan.topk_ids, indices)
    torch.testing.assert_close(plan.topk_weights, scores)
    assert plan.counts == torch.bincount(indices.flatten(), minlength=8).tolist()
