"""Grouped-query attention with RoPE over the paged KV cache (sliding window through the layout's mask).

Legend: B = sequences, Q = padded new tokens per sequence, K = key slots read per sequence,
H = query heads, G = kv heads, R = H / G query heads per kv head, Dh = head dim, T = new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixtral.layers import apply_rope, linear, linear_weight
from mixtral.layout import StepLayout


@dataclass(frozen=True)
class AttentionWeights:
    """The projections, each a mixtral.layers.linear_weight: the checkpoint's, or packed for oneDNN.
    q, k and v are one matrix, one GEMM: at a decode step's few rows each GEMM's cost is mostly its
    start (waking the coordinator's threads after the workers' turn), not its bytes."""

    wqkv: torch.Tensor  # [(H + 2G) * Dh, D]: the checkpoint's q_proj, k_proj, v_proj stacked
    wo: torch.Tensor  # [D, H*Dh]

    @staticmethod
    def of(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor, *, packed: bool = False) -> AttentionWeights:
        """From the checkpoint's [out, in] projections."""
        return AttentionWeights(linear_weight(torch.cat([wq, wk, wv]), packed=packed), linear_weight(wo, packed=packed))


def attention(
    x: torch.Tensor,
    w: AttentionWeights,
    layout: StepLayout,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    score_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [T, D] -> [T, D]. Writes this step's keys and values into the [G, slots, Dh] cache, then attends over it.

    The two GEMMs over the cache (scores, and the probabilities' sum of values) run in `score_dtype`
    (None: x's): float32 where the CPU's half-precision GEMM is slow, which for a decode step's few
    rows costs more than their upcast."""
    gemm = score_dtype or x.dtype
    num_tokens = x.shape[0]
    q, k, v = linear(x, w.wqkv).split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = apply_rope(q.view(num_tokens, num_heads, head_dim), *rope)  # [T, H, Dh]
    k = apply_rope(k.view(num_tokens, num_kv_heads, head_dim), *rope)  # [T, G, Dh]
    v = v.view(num_tokens, num_kv_heads, head_dim)
    cache_k[:, layout.write_slots] = k.transpose(0, 1)
    cache_v[:, layout.write_slots] = v.transpose(0, 1)

    batch, q_len = layout.q_index.shape
    group = num_heads // num_kv_heads
    # Whole blocks ([bs * Dh] contiguous per kv head), not slot by slot: a few large copies instead
    # of one per key. The gathered [G, B * NB, bs * Dh] is the [G, B, K, Dh] the GEMMs take.
    keys = _gather_blocks(cache_k, layout).view(num_kv_heads, batch, -1, head_dim).to(gemm)  # [G, B, K, Dh]
    values = _gather_blocks(cache_v, layout).view(num_kv_heads, batch, -1, head_dim).to(gemm)
    # Query head h uses kv head h // R (transformers' repeat_kv). The R heads of one kv head are
    # folded into the rows of one GEMM per (kv head, sequence): [R*Q, Dh] @ [Dh, K], so the keys
    # are neither repeated nor broadcast (a broadcast over R runs B*G*R tiny GEMVs instead).
    queries = q[layout.q_index].view(batch, q_len, num_kv_heads, group, head_dim).permute(2, 0, 3, 1, 4)
    queries = queries.reshape(num_kv_heads, batch, group * q_len, head_dim).to(gemm)  # [G, B, R*Q, Dh]

    scores = torch.matmul(queries, keys.transpose(-1, -2)).view(num_kv_heads, batch, group, q_len, -1)
    scores = scores * head_dim**-0.5 + layout.bias
    # Rounded to x's dtype first, as transformers rounds them, whatever the GEMM then runs in.
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype).to(gemm)  # [G, B, R, Q, K]
    out = torch.matmul(probs.view(num_kv_heads, batch, group * q_len, -1), values).to(x.dtype)  # [G, B, R*Q, Dh]
    out = out.view(num_kv_heads, batch, group, q_len, head_dim).permute(1, 3, 0, 2, 4)
    out = out.reshape(batch, q_len, num_heads * head_dim)[layout.q_valid]  # [T, H*Dh]
    return linear(out, w.wo)


def _gather_blocks(cache: torch.Tensor, layout: StepLayout) -> torch.Tensor:
    """[G, slots, Dh] cache -> [G, B * NB, block_size * Dh]: the blocks the layout reads, in its order."""
    num_kv_heads, _, head_dim = cache.shape
    return cache.view(num_kv_heads, -1, layout.block_size * head_dim).index_select(1, layout.key_blocks)
