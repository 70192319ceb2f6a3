"""What KV memory costs, counted in the paged cache's blocks.

The one accounting that the engine sizes its pool by and the planner plans with, so their figures
agree: bytes per token and per block, the blocks a budget buys, and the most blocks one sequence
holds at a time (a sliding window recycles the blocks that fall wholly out of it).
No torch here: the planner imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixtral.config import ModelArgs

BLOCK_SIZE = 16  # tokens per block, as vLLM's default
GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    block_size: int = BLOCK_SIZE

    @classmethod
    def of(cls, args: ModelArgs, dtype: str, block_size: int = BLOCK_SIZE) -> KVSpec:
        return cls(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, DTYPE_BYTES[dtype], block_size)

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one token in every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    def blocks_in(self, budget_bytes: float) -> int:
        """Whole blocks a budget holds."""
        return int(budget_bytes // self.bytes_per_block)

    def pool_bytes(self, num_blocks: int) -> int:
        return num_blocks * self.bytes_per_block

    def blocks_per_sequence(self, tokens: int, window: int | None) -> int:
        """The most blocks one sequence of `tokens` tokens holds at once, fed a token at a time.

        With a window W a query needs its own key and the W - 1 before it; those W positions span
        at most (W + block_size - 2) // block_size + 1 blocks, and blocks wholly before them are freed.
        """
        whole = math.ceil(tokens / self.block_size)
        if window is None:
            return whole
        return min(whole, (window + self.block_size - 2) // self.block_size + 1)

    def budget_problem(self, budget_bytes: float, max_model_len: int, window: int | None) -> str | None:
        """Why a pool of `budget_bytes` cannot serve one sequence of max_model_len, with the fix; None if it can."""
        blocks, per_sequence = self.blocks_in(budget_bytes), self.blocks_per_sequence(max_model_len, window)
        if blocks >= per_sequence:
            return None
        need = self.pool_bytes(per_sequence)
        shorter = f", or lower --max-model-len to {blocks * self.block_size}" if window is None and blocks else ""
        return (
            f"the KV cache budget of {budget_bytes / GiB:.4g} GiB holds {blocks} blocks of {self.block_size} tokens "
            f"({self.bytes_per_block} bytes each), but one sequence of max_model_len {max_model_len} needs "
            f"{per_sequence} blocks ({need / GiB:.4g} GiB); give --kv-cache-memory {math.ceil(need / GiB * 1e4) / 1e4} "
            f"or more{shorter}"
        )
