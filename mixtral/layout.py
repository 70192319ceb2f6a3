"""Where each token of a step sits: padded query grid, key blocks and positions, mask, cache writes.

Built once per step (per attention group) and shared by every layer. Legend: B = sequences,
Q = most new tokens of any sequence, K = key slots read per sequence (its held blocks times the
block size), T = new tokens in all.

Sequence b holds the blocks blocks[b] for its logical blocks first_block[b], first_block[b] + 1, ...:
position p lives in logical block p // block_size at offset p % block_size. This step's keys are
written into the cache before attention reads it, so every key a query sees comes from the cache.
That is safe because no block is ever written by two sequences: shared (prefix-cached) blocks are
full, and a sequence writes only past them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class StepLayout:
    positions: torch.Tensor  # [T] absolute position of each new token
    q_index: torch.Tensor  # [B, Q] flat token index of each padded query (0 where padding)
    q_valid: torch.Tensor  # [B, Q] True for real tokens
    key_blocks: torch.Tensor  # [B * NB] cache block of each block of keys each sequence reads (padding reads block 0, masked)
    block_size: int  # key k of sequence b is slot key_blocks[b * NB + k // block_size] * block_size + k % block_size
    bias: torch.Tensor  # [B, 1, Q, K] additive mask, 0 allowed, dtype-min not
    write_slots: torch.Tensor  # [T] cache slot each new token's key and value go to

    def to(self, device: str) -> StepLayout:
        """This layout with its tensors on `device`: a coordinator on a GPU indexes its cache with them."""
        values = (getattr(self, f.name) for f in fields(self))
        return StepLayout(*(v.to(device) if isinstance(v, torch.Tensor) else v for v in values))


def build_layout(
    *,
    blocks: list[list[int]],
    first_block: list[int],
    starts: list[int],
    lengths: list[int],
    block_size: int,
    window: int | None,
    dtype: torch.dtype,
) -> StepLayout:
    """starts[b]: tokens already cached for sequence b; lengths[b]: its new tokens this step.

    blocks[b] must cover every position from the window's reach (or 0) to starts[b] + lengths[b] - 1.
    """
    num_seqs, q_len = len(starts), max(lengths)
    held = max(len(b) for b in blocks)
    table = torch.tensor([b + [-1] * (held - len(b)) for b in blocks])  # [B, NB], -1 past a sequence's blocks
    start = torch.tensor(starts)[:, None]  # [B, 1]
    length = torch.tensor(lengths)[:, None]
    first = torch.tensor(first_block)[:, None]

    offset = torch.arange(q_len)[None, :]  # [1, Q]
    q_valid = offset < length
    q_pos = start + offset  # [B, Q]
    first_token = torch.cumsum(length, 0) - length
    q_index = torch.where(q_valid, first_token + offset, 0)

    in_block = torch.arange(block_size)
    key_pos = ((first + torch.arange(held))[:, :, None] * block_size + in_block).view(num_seqs, -1)  # [B, K]
    key_valid = (table >= 0).repeat_interleave(block_size, dim=1) & (key_pos < start + length)
    allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])  # [B, Q, K]
    if window is not None:
        allowed &= q_pos[:, :, None] - key_pos[:, None, :] < window
    bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)

    block_of = q_pos // block_size - first  # [B, Q] index into each table row
    q_slots = table.gather(1, block_of.clamp(0, held - 1)) * block_size + q_pos % block_size
    written = block_of[q_valid]
    if written.min() < 0 or written.max() >= held or (q_slots[q_valid] < 0).any():
        raise ValueError("a new token's block is not in its sequence's block table")  # it would overwrite another's keys
    return StepLayout(
        positions=q_pos[q_valid],
        q_index=q_index,
        q_valid=q_valid,
        key_blocks=table.clamp_min(0).reshape(-1),
        block_size=block_size,
        bias=bias[:, None],
        write_slots=q_slots[q_valid],
    )
