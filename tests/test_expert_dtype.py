"""Experts compute in the fastest dtype the machine has for their weights' precision."""

from __future__ import annotations

import torch

from cluster.engine.build import EngineOptions, local_engine
from mixtral import names
from mixtral.checkpoint import Checkpoint
from mixtral.layers import HeldExpert, expert_ffn, held_matmul, held_matrix, linear, linear_weight
from router.wire import Segment, new_secret
from workers.device import (
    HALF_GEMV_ROWS_TRIED,
    choose_compute_dtype,
    cores,
    half_gemv_rows,
    matmul_dtype,
    matmul_rates,
    onednn_packs,
)
from workers.expert_worker import ExpertWorker


def test_a_slow_half_precision_matmul_is_computed_in_float32() -> None:
    bf16, f32 = torch.bfloat16, torch.float32
    assert choose_compute_dtype(bf16, {bf16: 1e9, f32: 24e9}) == f32  # emulated bf16, as on an AMD EPYC without it
    assert choose_compute_dtype(bf16, {bf16: 40e9, f32: 24e9}) == bf16  # native bf16 (AVX512_BF16, AMX)
    assert choose_compute_dtype(f32, {f32: 24e9}) == f32
    assert all(rate > 0 for rate in matmul_rates((bf16, f32), "cpu").values())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert matmul_dtype.__wrapped__(bf16, "cpu") in (bf16, f32)  # measured afresh, on one thread
        assert torch.get_num_threads() == 2  # and the caller's threads are as they were
    finally:
        torch.set_num_threads(threads)
    assert half_gemv_rows(256, 64, bf16) in (0, *HALF_GEMV_ROWS_TRIED)  # a measured crossover, or none
    assert half_gemv_rows(256, 64, bf16, packed=True) in (0, *HALF_GEMV_ROWS_TRIED)  # against oneDNN's float32
    assert matmul_dtype(f32, "cpu") == f32 and matmul_dtype(bf16, "cuda") == bf16


def test_a_bf16_expert_matches_its_weights_computed_in_float32_whatever_it_chose(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    checkpoint = Checkpoint.open(make_ckpt())
    worker = ExpertWorker(checkpoint, 1, channel_secret=new_secret(), dtype="bfloat16")
    assert worker.info().compute_dtype == str(matmul_dtype(torch.bfloat16, "cpu")).removeprefix("torch.")
    x = torch.randn(5, checkpoint.args.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y = worker.forward(0, x)
    assert y.dtype == torch.bfloat16  # the wire's dtype, whatever the GEMMs ran in
    weights = dict(checkpoint.reader().read(names.expert_weights(checkpoint.args.num_hidden_layers, 1), dtype=torch.bfloat16))
    w1, w2, w3 = (weights[names.expert_weight(0, 1, w)].float() for w in ("w1", "w2", "w3"))
    reference = expert_ffn(x.float(), w1, w2, w3)
    torch.testing.assert_close(y.float(), reference, rtol=1.6e-2, atol=1e-2)  # bf16's resolution: 8 bits of mantissa


def test_calls_of_few_rows_use_the_checkpoints_bf16_matrices_kept_beside_the_float32_ones(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    """Where bf16 GEMMs are emulated the worker computes in float32, and keeps the checkpoint's bf16
    matrices too for calls of up to `half_rows` rows (reading half the bytes); both give the product
    within bf16's resolution. Where bf16 is native there is nothing to keep."""
    checkpoint = Checkpoint.open(make_ckpt())
    args = checkpoint.args
    worker = ExpertWorker(checkpoint, [1, 2], channel_secret=new_secret(), dtype="bfloat16", half_rows=2)
    demoted = worker.info().compute_dtype == "float32"
    weights_per_expert = args.num_hidden_layers * 3 * args.hidden_size * args.intermediate_size
    assert worker.info().half_rows == (2 if demoted else 0)
    assert worker.expert_bytes() == 2 * weights_per_expert * (4 + 2 if demoted else 2)
    x = torch.randn(5, args.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = worker.forward(1, x, [Segment(1, 2), Segment(2, 3)])  # 2 rows: the bf16 matrices; 3: float32
    weights = dict(
        checkpoint.reader().read(
            names.expert_weights(args.num_hidden_layers, 1) + names.expert_weights(args.num_hidden_layers, 2),
            dtype=torch.bfloat16,
        )
    )
    for expert, rows in ((1, slice(0, 2)), (2, slice(2, 5))):
        w1, w2, w3 = (weights[names.expert_weight(1, expert, w)].float() for w in ("w1", "w2", "w3"))
        reference = expert_ffn(x[rows].float(), w1, w2, w3)
        torch.testing.assert_close(y[rows].float(), reference, rtol=1.6e-2, atol=1e-2)  # bf16's resolution
    if demoted:  # which rows ran on the bf16 matrices: zero them, and only the 2-row call turns to zeros
        kept = worker.experts[1][1]
        assert isinstance(kept, HeldExpert) and kept.half is not None
        worker.experts[1][1] = kept._replace(half=(torch.zeros_like(kept.half[0]), kept.half[1], kept.half[2]))
        again = worker.forward(1, x, [Segment(1, 2), Segment(1, 3)])
        assert (again[:2] == 0).all() and (again[2:] != 0).any()


def test_the_coordinators_attention_gemms_run_in_the_dtype_the_experts_chose(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    """Its two GEMMs over the KV cache (mixtral.attention's score_dtype): float32 where bf16 is emulated."""
    checkpoint = Checkpoint.open(make_ckpt())
    bf16 = local_engine(checkpoint, EngineOptions(dtype="bfloat16")).model
    assert bf16.score_dtype == matmul_dtype(torch.bfloat16, "cpu")
    assert local_engine(checkpoint, EngineOptions(dtype="float32")).model.score_dtype == torch.float32


def test_float32_workers_of_several_threads_pack_their_matrices_for_onednn_and_compute_the_same_products() -> None:
    f32 = torch.float32
    assert onednn_packs(f32, "cpu", 2)  # torch's CPU wheels have oneDNN
    assert not onednn_packs(f32, "cpu", 1)  # one thread: MKL's GEMV of one row is the faster
    assert not onednn_packs(torch.bfloat16, "cpu", 2) and not onednn_packs(f32, "cuda", 2)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 80, generator=g)  # [out, in], as the checkpoint has it
    packed, plain = held_matrix(w, f32, packed=True), held_matrix(w, f32)
    assert packed.is_mkldnn and not plain.is_mkldnn and plain.shape == (80, 96)
    for rows in (0, 1, 3, 17, 64):
        x = torch.randn(rows, 80, generator=g)
        reference = torch.nn.functional.linear(x, w)
        torch.testing.assert_close(held_matmul(x, packed), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(held_matmul(x, plain), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x, linear_weight(w, packed=True)), reference, rtol=1e-5, atol=1e-5)
    assert linear_weight(w, packed=False) is w


def test_a_float32_coordinator_on_several_threads_packs_its_projections_and_lm_head(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    checkpoint = Checkpoint.open(make_ckpt())
    for threads in (2, 1):
        coordinator = local_engine(checkpoint, EngineOptions(dtype="float32"), coordinator_threads=threads).model
        attn = coordinator.layers[0].attn
        assert coordinator.packed == (threads > 1)
        assert all(m.is_mkldnn == (threads > 1) for m in (coordinator.lm_head, attn.wqkv, attn.wo))
    assert not local_engine(checkpoint, EngineOptions(dtype="bfloat16"), coordinator_threads=2).model.packed
    # By default on every core: on this project's 2-core machines, every float32 engine-against-transformers
    # test (tests/test_parity.py and the rest) runs the coordinator on oneDNN.
    assert local_engine(checkpoint, EngineOptions(dtype="float32")).model.packed == (cores() > 1)


def test_half_precision_matrices_are_held_in_the_checkpoints_layout_and_compute_the_same_products() -> None:
    """torch's bf16 GEMM reads [out, in] faster than the transposed copy a float32 worker holds
    (docs/performance.md): a bf16 worker holds the checkpoint's matrix as it is."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 80, generator=g)
    for half in (torch.bfloat16, torch.float16):
        held = held_matrix(w, half)
        assert held.shape == (96, 80) and held.dtype == half and held.is_contiguous()
        for rows in (0, 1, 3, 17):
            x = torch.randn(rows, 80, generator=g).to(half)
            reference = torch.nn.functional.linear(x.float(), w.to(half).float())
            torch.testing.assert_close(held_matmul(x, held).float(), reference, rtol=2e-2, atol=2e-2)
