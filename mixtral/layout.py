"""Where each token of a step sits: padded query grid, key positions, mask, cache writes.

Built once per step and shared by every layer. Legend: B = sequences in the step, Q = most new
tokens of any sequence, Kc = cache columns read, T = new tokens in all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepLayout:
    positions: torch.Tensor  # [T] absolute position of each new token
    slots: torch.Tensor | slice  # [B] cache slot of each sequence; a slice when they are consecutive
    q_index: torch.Tensor  # [B, Q] flat token index of each padded query (0 where padding)
    q_valid: torch.Tensor  # [B, Q] True for real tokens
    cached: int  # Kc, cache columns each sequence reads
    # Decode (one new token each): keys are written into the cache first and read back from it
    # with the rest, so attention needs no concatenation. Safe because the column a new key takes
    # held position p - C, which no query of this step can see (outside the window, or never
    # written: the cache is reserved to hold every sequence whole until the window caps it).
    write_first: bool
    bias: torch.Tensor  # [B, 1, 1, Q, K] additive mask, 0 allowed, dtype-min not; K = Kc (+ Q unless write_first)
    write_slot: torch.Tensor  # [W] cache writes: slot,
    write_col: torch.Tensor  # [W] column,
    write_token: torch.Tensor  # [W] and which new token's k/v goes there


def build_layout(
    *, slots: list[int], starts: list[int], lengths: list[int], capacity: int, window: int | None, dtype: torch.dtype
) -> StepLayout:
    """starts[b]: tokens already cached for sequence b; lengths[b]: its new tokens this step."""
    num_seqs, q_len = len(slots), max(lengths)
    start = torch.tensor(starts)[:, None]  # [B, 1]
    length = torch.tensor(lengths)[:, None]  # [B, 1]
    offset = torch.arange(q_len)[None, :]  # [1, Q]
    q_valid = offset < length  # [B, Q]
    q_pos = start + offset  # [B, Q]
    first_token = torch.cumsum(length, 0) - length  # [B, 1]
    q_index = torch.where(q_valid, first_token + offset, 0)

    write_first = q_len == 1
    newest = start if write_first else start - 1  # the newest position in the cache when it is read
    cached = min(capacity, max(starts) + (1 if write_first else 0))
    col = torch.arange(cached)[None, :]  # [1, Kc]
    # The newest position p <= newest with p = col (mod capacity); negative when never written.
    cache_pos = newest - torch.remainder(newest - col, capacity)  # [B, Kc]
    if write_first:
        key_pos, key_valid = cache_pos, cache_pos >= 0
    else:
        key_pos = torch.cat([cache_pos, q_pos], dim=1)  # [B, Kc + Q]
        key_valid = torch.cat([cache_pos >= 0, q_valid], dim=1)

    allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])  # [B, Q, Kc + Q]
    if window is not None:
        allowed &= q_pos[:, :, None] - key_pos[:, None, :] < window
    bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)

    # Only the last `capacity` new tokens of a sequence are kept: earlier ones would be overwritten.
    keep = q_valid & (offset >= length - capacity)
    return StepLayout(
        positions=q_pos[q_valid],
        slots=_slot_index(slots),
        q_index=q_index,
        q_valid=q_valid,
        cached=cached,
        write_first=write_first,
        bias=bias[:, None, None],
        write_slot=torch.tensor(slots)[:, None].expand(num_seqs, q_len)[keep],
        write_col=torch.remainder(q_pos, capacity)[keep],
        write_token=q_index[keep],
    )


def _slot_index(slots: list[int]) -> torch.Tensor | slice:
    """Consecutive slots (the usual case: sequences admitted together keep their order) index the
    cache as a slice, which reads keys in place; a list of slots gathers a copy of every key."""
    first = slots[0]
    return slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else torch.tensor(slots)
