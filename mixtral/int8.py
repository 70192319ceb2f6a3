"""Weight-only int8 experts: per-output-channel symmetric scales, activations stay in float.

    scale[n] = max_k |W[n, k]| / 127          q[n, k] = round(W[n, k] / scale[n])  in [-127, 127]
    W x      ~ scale * (q x)                  (the error of one weight is at most scale[n] / 2)

Half the bytes of bf16 per expert (plus one scale per row). The GEMM runs in torch's int8 weight
kernel where one serves the activations' dtype (CPU, bf16/fp16); elsewhere the weights are
dequantized in the call, so the result is the dequantized float model's to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

QMAX = 127
HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Int8Weight:
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] float32

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.scale[:, None]).to(dtype)


def quantize(w: torch.Tensor) -> Int8Weight:
    """Per output row (dim 0) of w [N, K]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return Int8Weight(q, scale)


def int8_linear(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x [T, K] @ W^T -> [T, N], in x's dtype."""
    if x.device.type == "cpu" and x.dtype in HALF:
        return torch._weight_int8pack_mm(x.contiguous(), w.q, w.scale.to(x.dtype))
    return F.linear(x, w.dequantize(x.dtype))


def int8_expert_ffn(x: torch.Tensor, w1: Int8Weight, w2: Int8Weight, w3: Int8Weight) -> torch.Tensor:
    """SwiGLU expert w2(silu(w1 x) * w3 x) with int8 weights.  x [T, D] -> [T, D]."""
    return int8_linear(F.silu(int8_linear(x, w1)) * int8_linear(x, w3), w2)
