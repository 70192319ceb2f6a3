"""Experts compute in the fastest dtype the machine has for their weights' precision (issue 15, item 4)."""

from __future__ import annotations

import torch

from mixtral import names
from mixtral.checkpoint import Checkpoint
from mixtral.layers import expert_ffn
from router.wire import new_secret
from workers.device import choose_compute_dtype, expert_compute_dtype, matmul_rates
from workers.expert_worker import ExpertWorker


def test_a_slow_half_precision_matmul_is_computed_in_float32() -> None:
    bf16, f32 = torch.bfloat16, torch.float32
    assert choose_compute_dtype(bf16, {bf16: 1e9, f32: 24e9}) == f32  # emulated bf16, as on an AMD EPYC without it
    assert choose_compute_dtype(bf16, {bf16: 40e9, f32: 24e9}) == bf16  # native bf16 (AVX512_BF16, AMX)
    assert choose_compute_dtype(f32, {f32: 24e9}) == f32
    assert all(rate > 0 for rate in matmul_rates((bf16, f32), "cpu").values())
    threads = torch.get_num_threads()
    assert expert_compute_dtype.__wrapped__(bf16, "cpu") in (bf16, f32)  # measured afresh, on one thread
    assert torch.get_num_threads() == threads  # and the caller's threads are as they were
    assert expert_compute_dtype(f32, "cpu") == f32 and expert_compute_dtype(bf16, "cuda") == bf16


def test_a_bf16_expert_matches_its_weights_computed_in_float32_whatever_it_chose(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    checkpoint = Checkpoint.open(make_ckpt())
    worker = ExpertWorker(checkpoint, 1, channel_secret=new_secret(), dtype="bfloat16")
    assert worker.info().compute_dtype == str(expert_compute_dtype(torch.bfloat16, "cpu")).removeprefix("torch.")
    x = torch.randn(5, checkpoint.args.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y = worker.forward(0, x)
    assert y.dtype == torch.bfloat16  # the wire's dtype, whatever the GEMMs ran in
    weights = dict(checkpoint.reader().read(names.expert_weights(checkpoint.args.num_hidden_layers, 1), dtype=torch.bfloat16))
    w1, w2, w3 = (weights[names.expert_weight(0, 1, w)].float() for w in ("w1", "w2", "w3"))
    reference = expert_ffn(x.float(), w1, w2, w3)
    torch.testing.assert_close(y.float(), reference, rtol=1.6e-2, atol=1e-2)  # bf16's resolution: 8 bits of mantissa
