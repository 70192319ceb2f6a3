"""The paged KV cache: a fixed pool of blocks, allocated once from a memory budget.

Per layer, k and v are [G, N * block_size, Dh] (G kv heads, N blocks): token slot s = block *
block_size + offset. A sequence's keys are wherever its block table points; attention gathers
whole blocks with one index_select over the [G, N, block_size * Dh] view, which yields
[G, B * NB, block_size * Dh]: the [G, B, K, Dh] order its GEMMs take, with no second copy.
Which block belongs to whom is the engine's business (cluster/engine/kv_manager.py); this holds
only the memory.
"""

from __future__ import annotations

import torch

from mixtral.kv_spec import KVSpec


class PagedKVCache:
    def __init__(self, spec: KVSpec, num_blocks: int, *, dtype: torch.dtype, device: str = "cpu") -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = spec.block_size
        # Zeros, not empty: padded key slots are read (and masked); garbage could hold NaN, and 0 * NaN is NaN.
        shape = (spec.num_kv_heads, num_blocks * spec.block_size, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]

    @property
    def nbytes(self) -> int:
        """Bytes the pool's tensors hold: what the budget bounds."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
