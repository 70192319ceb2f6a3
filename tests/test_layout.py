"""Step layouts (positions, padding, cache writes, mask) against loops over positions; attention against full attention."""

from __future__ import annotations

import pytest
import torch

from mixtral.attention import AttentionWeights, attention
from mixtral.kv_cache import KVCache
from mixtral.layers import apply_rope, rope_cos_sin
from mixtral.layout import build_layout

# name: slots, starts, lengths, capacity, window
CASES: dict[str, tuple[list[int], list[int], list[int], int, int | None]] = {
    "fresh prompts": ([0, 1, 2], [0, 0, 0], [5, 2, 3], 16, None),
    "continued chunks": ([1, 2], [6, 3], [4, 2], 16, None),
    "decodes at different positions": ([0, 1, 2], [9, 0, 14], [1, 1, 1], 16, None),
    "a decode beside a chunk": ([3, 1], [7, 2], [1, 5], 16, None),
    "decodes in a wrapped rolling buffer": ([2, 0], [13, 3], [1, 1], 8, 8),
    "chunks in a wrapped rolling buffer": ([0, 1], [10, 21], [3, 11], 8, 8),
}


def held_position(column: int, written: int, capacity: int) -> int | None:
    """The position whose key is in `column` once positions 0..written-1 went to column p mod capacity."""
    held = [p for p in range(written) if p % capacity == column]
    return held[-1] if held else None


@pytest.mark.parametrize("case", CASES)
def test_layout_matches_loops_over_positions(case: str) -> None:
    slots, starts, lengths, capacity, window = CASES[case]
    layout = build_layout(slots=slots, starts=starts, lengths=lengths, capacity=capacity, window=window, dtype=torch.float32)
    decode = all(n == 1 for n in lengths)
    q_len, first = max(lengths), [sum(lengths[:b]) for b in range(len(lengths))]

    assert layout.positions.tolist() == [p for s, n in zip(starts, lengths) for p in range(s, s + n)]
    assert layout.q_valid.tolist() == [[i < n for i in range(q_len)] for n in lengths]
    assert layout.q_index.tolist() == [[f + i if i < n else 0 for i in range(q_len)] for f, n in zip(first, lengths)]
    assert layout.write_first == decode
    writes = [
        (slot, (s + i) % capacity, f + i)
        for slot, s, n, f in zip(slots, starts, lengths, first)
        for i in range(max(0, n - capacity), n)
    ]
    assert sorted(zip(layout.write_slot.tolist(), layout.write_col.tolist(), layout.write_token.tolist())) == sorted(writes)

    assert layout.cached <= capacity
    assert layout.bias.shape == (len(slots), 1, 1, q_len, layout.cached + (0 if decode else q_len))
    for b, (s, n) in enumerate(zip(starts, lengths)):
        # A decode's key is in the cache when it is read; a chunk's new keys follow the cache columns.
        keys = [held_position(c, s + 1 if decode else s, capacity) for c in range(layout.cached)]
        keys += [] if decode else [s + j if j < n else None for j in range(q_len)]
        for i in range(n):
            q = s + i
            expected = [p is not None and p <= q and (window is None or q - p < window) for p in keys]
            assert (layout.bias[b, 0, 0, i] == 0).tolist() == expected, (b, i)
            # So the query sees each position of its window exactly once.
            lowest = 0 if window is None else max(0, q - window + 1)
            assert sorted(p for p, ok in zip(keys, expected) if ok and p is not None) == list(range(lowest, q + 1))


def test_consecutive_slots_index_the_cache_as_a_slice() -> None:
    def slot_index(slots: list[int]) -> torch.Tensor | slice:
        n = len(slots)
        return build_layout(slots=slots, starts=[3] * n, lengths=[1] * n, capacity=16, window=None, dtype=torch.float32).slots

    assert slot_index([2, 3, 4]) == slice(2, 5)
    assert slot_index([5]) == slice(5, 6)
    for slots in ([2, 0], [0, 2, 3], [1, 0]):
        index = slot_index(slots)
        assert isinstance(index, torch.Tensor) and index.tolist() == slots


H, G, DH, D, THETA = 4, 2, 8, 16, 10000.0


def reference_attention(x: torch.Tensor, w: AttentionWeights, window: int | None) -> torch.Tensor:
    """Full causal GQA attention over a whole sequence x [L, D], from scratch."""
    n = x.shape[0]
    cos, sin = rope_cos_sin(torch.arange(n), head_dim=DH, theta=THETA, dtype=torch.float32)
    q = apply_rope((x @ w.wq.T).view(n, H, DH), cos, sin)
    k = apply_rope((x @ w.wk.T).view(n, G, DH), cos, sin)
    v = (x @ w.wv.T).view(n, G, DH)
    pos = torch.arange(n)
    allowed = pos[None, :] <= pos[:, None]  # [query, key]
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    heads = []
    for h in range(H):
        g = h // (H // G)
        scores = (q[:, h] @ k[:, g].T) / DH**0.5
        heads.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, g])
    return torch.cat(heads, dim=1) @ w.wo.T


@pytest.mark.parametrize("slots", [[0, 1], [2, 0]])
@pytest.mark.parametrize("window", [None, 4])
def test_chunked_prefill_and_decode_through_the_cache_match_full_attention(window: int | None, slots: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    w = AttentionWeights(
        wq=torch.randn(H * DH, D, generator=g) / D**0.5,
        wk=torch.randn(G * DH, D, generator=g) / D**0.5,
        wv=torch.randn(G * DH, D, generator=g) / D**0.5,
        wo=torch.randn(D, H * DH, generator=g) / (H * DH) ** 0.5,
    )
    cache = KVCache(num_layers=1, num_slots=3, num_kv_heads=G, head_dim=DH, max_capacity=window or 64, dtype=torch.float32)
    # Stale keys of earlier sequences must never be attended to.
    cache.k[0].normal_(0, 100, generator=g)
    cache.v[0].normal_(0, 100, generator=g)
    # Two prompts (11 and 7 tokens) in two chunks each, then two decode steps.
    steps = [[6, 4], [5, 3], [1, 1], [1, 1]]
    xs = [torch.randn(sum(step[b] for step in steps), D, generator=g) for b in range(2)]
    outputs: list[list[torch.Tensor]] = [[], []]
    starts = [0, 0]
    for lengths in steps:
        cache.reserve(max(s + n for s, n in zip(starts, lengths)))
        layout = build_layout(
            slots=slots, starts=starts, lengths=lengths, capacity=cache.capacity, window=window, dtype=torch.float32
        )
        rope = rope_cos_sin(layout.positions, head_dim=DH, theta=THETA, dtype=torch.float32)
        x = torch.cat([xs[b][s : s + n] for b, (s, n) in enumerate(zip(starts, lengths))])
        out = attention(x, w, layout, cache.k[0], cache.v[0], rope, num_heads=H, num_kv_heads=G, head_dim=DH)
        for b, part in enumerate(out.split(lengths)):
            outputs[b].append(part)
        starts = [s + n for s, n in zip(starts, lengths)]
    assert cache.capacity == (window or 16)
    for b in range(2):
        torch.testing.assert_close(torch.cat(outputs[b]), reference_attention(xs[b], w, window), rtol=1e-5, atol=1e-5)
