"""Grouped-query attention with RoPE over the KV cache (sliding window through the layout's mask).

Legend: B = sequences, Q = padded new tokens per sequence, K = keys (cache columns + Q),
H = query heads, G = kv heads, R = H / G query heads per kv head, Dh = head dim, T = new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixtral.layers import apply_rope
from mixtral.layout import StepLayout


@dataclass(frozen=True)
class AttentionWeights:
    wq: torch.Tensor  # [H*Dh, D]
    wk: torch.Tensor  # [G*Dh, D]
    wv: torch.Tensor  # [G*Dh, D]
    wo: torch.Tensor  # [D, H*Dh]


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
) -> torch.Tensor:
    """x [T, D] -> [T, D], writing this step's keys and values into the cache (see StepLayout.write_first)."""
    num_tokens = x.shape[0]
    q = apply_rope(F.linear(x, w.wq).view(num_tokens, num_heads, head_dim), *rope)  # [T, H, Dh]
    k = apply_rope(F.linear(x, w.wk).view(num_tokens, num_kv_heads, head_dim), *rope)  # [T, G, Dh]
    v = F.linear(x, w.wv).view(num_tokens, num_kv_heads, head_dim)

    batch, q_len = layout.q_index.shape
    group = num_heads // num_kv_heads
    past = slice(0, layout.cached)
    if layout.write_first:
        _write(cache_k, cache_v, k, v, layout)
        keys, values = cache_k[layout.slots, :, past], cache_v[layout.slots, :, past]  # [B, G, K, Dh]
    else:  # read the cache before this step's keys overwrite any of it, then append them
        keys = torch.cat([cache_k[layout.slots, :, past], k[layout.q_index].transpose(1, 2)], dim=2)
        values = torch.cat([cache_v[layout.slots, :, past], v[layout.q_index].transpose(1, 2)], dim=2)
    # Query head h uses kv head h // R (transformers' repeat_kv). The R heads of one kv head are
    # folded into the rows of one GEMM per (sequence, kv head): [R*Q, Dh] @ [Dh, K], so the keys
    # are neither repeated nor broadcast (a broadcast over R runs B*G*R tiny GEMVs instead).
    queries = q[layout.q_index].view(batch, q_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    queries = queries.reshape(batch, num_kv_heads, group * q_len, head_dim)  # [B, G, R*Q, Dh]

    scores = torch.matmul(queries, keys.transpose(-1, -2)).view(batch, num_kv_heads, group, q_len, -1)
    scores = scores * head_dim**-0.5 + layout.bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)  # [B, G, R, Q, K]
    out = torch.matmul(probs.view(batch, num_kv_heads, group * q_len, -1), values)  # [B, G, R*Q, Dh]
    out = out.view(batch, num_kv_heads, group, q_len, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(batch, q_len, num_heads * head_dim)[layout.q_valid]  # [T, H*Dh]

    if not layout.write_first:
        _write(cache_k, cache_v, k, v, layout)
    return F.linear(out, w.wo)


def _write(cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: StepLayout) -> None:
    """This step's keys and values [T, G, Dh] into their slots' columns of the [S, G, C, Dh] cache."""
    cache_k[layout.write_slot, :, layout.write_col] = k[layout.write_token]
    cache_v[layout.write_slot, :, layout.write_col] = v[layout.write_token]
