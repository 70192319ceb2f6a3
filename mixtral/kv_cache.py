"""A KV cache for many sequences of different lengths, one slot each.

Per layer, k and v are [S, G, C, Dh] (S slots, G kv heads, C columns): a slot's keys for one kv
head are one [C, Dh] matrix, which attention multiplies without copying it into shape. The key
of position p lives in column p mod C: with a sliding window W, C = W and this is the rolling-buffer cache of
the Mistral 7B paper, so memory stops growing past W. Without a window C grows (doubling) with
the longest sequence, up to max_model_len; it only grows while no sequence has wrapped, so a
position's column never changes on growth.
"""

from __future__ import annotations

import torch

MIN_CAPACITY = 16


class KVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        max_capacity: int,
        dtype: torch.dtype,
        device: str = "cpu",
    ) -> None:
        self.num_slots = num_slots
        self.max_capacity = max_capacity
        self.capacity = min(MIN_CAPACITY, max_capacity)
        shape = (num_slots, num_kv_heads, self.capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV cache slot; the scheduler must cap running sequences")
        return self._free.pop()

    def release(self, slot: int) -> None:
        # Stale keys stay in the slot: validity comes from positions, so nothing needs clearing.
        self._free.append(slot)

    def reserve(self, length: int) -> None:
        """Make room for sequences up to `length` tokens (bounded by the window / max_model_len)."""
        needed = min(length, self.max_capacity)
        if needed <= self.capacity:
            return
        new_capacity = self.capacity
        while new_capacity < needed:
            new_capacity *= 2
        new_capacity = min(new_capacity, self.max_capacity)
        self.k = [_grow(t, new_capacity) for t in self.k]
        self.v = [_grow(t, new_capacity) for t in self.v]
        self.capacity = new_capacity


def _grow(t: torch.Tensor, capacity: int) -> torch.Tensor:
    slots, heads, columns, head_dim = t.shape
    grown = torch.zeros((slots, heads, capacity, head_dim), dtype=t.dtype, device=t.device)
    grown[:, :, :columns] = t
    return grown
