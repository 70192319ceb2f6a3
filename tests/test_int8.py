"""int8 weight-only experts: per-channel scales, half the bytes of bf16, and an
expert's output within a stated tolerance of the same expert with its weights dequantized."""

from __future__ import annotations

import pytest
import torch

from cluster.bench.agreement import agreeing_prefix, greedy_agreement
from mixtral import names
from mixtral.checkpoint import Checkpoint
from mixtral.int8 import QMAX, int8_expert_ffn, quantize
from mixtral.layers import expert_ffn
from router.wire import Segment, new_secret
from workers.expert_worker import ExpertWorker


def test_per_channel_quantization_rounds_each_weight_to_its_rows_grid() -> None:
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 48)[:, None]
    q = quantize(w)
    assert q.q.dtype == torch.int8 and q.q.abs().max() <= QMAX
    assert torch.equal(q.q.abs().amax(dim=1), torch.full((48,), QMAX, dtype=torch.int8))  # each row uses its whole range
    # Every weight is within half a step of its row's grid: the rounding, and nothing else.
    assert ((q.dequantize() - w).abs() <= q.scale[:, None] / 2 * (1 + 1e-6)).all()
    assert q.nbytes == w.numel() + 4 * 48  # a byte a weight, a float32 scale a row: half of bf16


def dequantized_reference(worker_weights, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    w1, w2, w3 = (w.dequantize(torch.float32) for w in worker_weights)
    return expert_ffn(x.float(), w1, w2, w3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_int8_worker_is_within_tolerance_of_its_dequantized_weights(make_ckpt, dtype: str) -> None:  # type: ignore[no-untyped-def]
    """The stated tolerance: in float32, float rounding of the same products (rtol 1e-5); with bf16
    activations, which take torch's int8 kernel on a CPU, bf16's resolution (8 bits of mantissa)."""
    checkpoint = Checkpoint.open(make_ckpt())
    worker = ExpertWorker(checkpoint, [1, 6], worker=0, channel_secret=new_secret(), dtype=dtype, expert_dtype="int8")
    info = worker.info()
    assert info.expert_dtype == "int8" and info.compute_dtype == dtype
    float_bytes = sum(
        t.numel() * 2
        for t in dict(
            checkpoint.reader().read(names.expert_weights(checkpoint.args.num_hidden_layers, 1), dtype=torch.float32)
        ).values()
    )
    assert info.expert_bytes < 2 * float_bytes * 0.55  # two experts, each about half of its bf16 bytes
    x = torch.randn(7, checkpoint.args.hidden_size, generator=torch.Generator().manual_seed(1)).to(getattr(torch, dtype))
    for layer in range(checkpoint.args.num_hidden_layers):
        y = worker.forward(layer, x, (Segment(6, 3), Segment(1, 4)))
        assert y.dtype == x.dtype
        reference = torch.cat(
            [dequantized_reference(worker.experts[6][layer], x[:3]), dequantized_reference(worker.experts[1][layer], x[3:])]
        )
        if dtype == "float32":
            torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(y.float(), reference, rtol=1.6e-2, atol=1e-2)


def test_int8_experts_stay_close_to_the_float_model(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    """The int8 expert itself is near its float weights (per-channel rounding only), and a model of
    int8 experts mostly agrees with the float one; the README has the figures for tiny and mini."""
    checkpoint = Checkpoint.open(make_ckpt())
    args = checkpoint.args
    weights = dict(checkpoint.reader().read(names.expert_weights(args.num_hidden_layers, 0), dtype=torch.float32))
    w1, w2, w3 = (weights[names.expert_weight(0, 0, w)] for w in ("w1", "w2", "w3"))
    x = torch.randn(16, args.hidden_size, generator=torch.Generator().manual_seed(2))
    exact = expert_ffn(x, w1, w2, w3)
    approx = int8_expert_ffn(x, quantize(w1), quantize(w2), quantize(w3))
    assert (approx - exact).norm() / exact.norm() < 0.02
    result = greedy_agreement(checkpoint, expert_dtype="int8", prompts=4, prompt_len=8, max_tokens=12)
    assert result.prompts == 4 and len(result.agreeing_prefix) == 4
    assert result.prefix_share > 0.25  # not noise: random weights' logits are close, so a flip comes early sometimes
    assert agreeing_prefix([1, 2, 3], [1, 2, 4]) == 2 and agreeing_prefix([1, 2], [1, 2]) == 2
