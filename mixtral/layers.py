"""The per-layer math shared by the coordinator and the workers, written as the paper states it.

Legend for shape comments: T = tokens in the step, D = hidden size, I = expert FFN size,
H = query heads, G = key/value heads, Dh = head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# What a worker holds in the checkpoint's own layout (held_matrix).
HALF_DTYPES = (torch.bfloat16, torch.float16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and cast back before the scale, as transformers does, so bf16 matches.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert: w2(silu(w1 x) * w3 x).  x [T, D], w1/w3 [I, D], w2 [D, I] (the checkpoint's) -> [T, D]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class HeldExpert(NamedTuple):
    """One expert's matrices of one layer as a worker holds them (held_matrix), each the right operand
    of held_matmul. `half`: also the checkpoint's own half-precision w1, w2, w3 ([out, in]), where the
    worker computes in float32 but a call of a few rows is faster on these (workers.device.half_gemv_rows)."""

    w1: torch.Tensor  # D -> I
    w2: torch.Tensor  # I -> D
    w3: torch.Tensor  # D -> I
    half: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in (self.w1, self.w2, self.w3, *(self.half or ())))

    @staticmethod
    def of(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, dtype: torch.dtype) -> HeldExpert:
        """From the checkpoint's [out, in] matrices, in `dtype`, as a worker of one thread holds them."""
        return HeldExpert(*(held_matrix(w, dtype) for w in (w1, w2, w3)))


def held_matrix(w: torch.Tensor, dtype: torch.dtype, *, packed: bool = False) -> torch.Tensor:
    """A checkpoint matrix [out, in] as a worker holds it, in `dtype`, for held_matmul: in float32,
    transposed to [in, out], in one copy, or `packed` in oneDNN's blocked layout (on a CPU only); in
    half precision, as it is. For the few to few tens of rows an expert gets per call, MKL's float32
    GEMM reads [in, out] faster than the checkpoint's layout, and oneDNN's on its packing faster still
    on several threads; torch's bf16 GEMM reads the checkpoint's layout faster than [in, out], at every
    row count an expert gets (README, "Performance with a map"; docs/performance.md)."""
    if packed:
        return linear_weight(w.to(dtype), packed=True)
    if dtype in HALF_DTYPES:
        return w.to(dtype).contiguous()
    return torch.empty(w.shape[1], w.shape[0], dtype=dtype, device=w.device).copy_(w.t())


def held_matmul(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h [T, in] times a held matrix (held_matrix) -> [T, out]."""
    if w.is_mkldnn:
        return linear(h, w)
    return F.linear(h, w) if w.dtype in HALF_DTYPES else h @ w


def linear_weight(w: torch.Tensor, *, packed: bool) -> torch.Tensor:
    """A checkpoint matrix [out, in] for `linear`: as it is, or `packed` in oneDNN's blocked layout
    (float32 on a CPU only: workers.device.onednn_packs), a copy."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None) if packed else w


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) over a linear_weight, packed or not.  x [T, in] -> [T, out]."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


def held_expert_ffn(x: torch.Tensor, w: HeldExpert, *, half_rows: int = 0) -> torch.Tensor:
    """expert_ffn on a held expert, in x's dtype: on its half-precision matrices for up to `half_rows`
    rows, where it holds them, else in its matrices' dtype.  x [T, D] -> [T, D]."""
    if w.half is not None and x.shape[0] <= half_rows:
        return expert_ffn(x.to(w.half[0].dtype), *w.half).to(x.dtype)
    h = x.to(w.w1.dtype)
    return held_matmul(F.silu(held_matmul(h, w.w1)) * held_matmul(h, w.w3), w.w2).to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, *, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, Dh] for absolute positions [T], in the rotate-half layout of HF checkpoints."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Dh]; cos/sin [T, Dh]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
