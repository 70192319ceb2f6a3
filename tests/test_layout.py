"""Step layouts (positions, key slots, mask, cache writes) against loops over positions; paged attention
against full attention."""

from __future__ import annotations

import pytest
import torch

from cluster.engine.block_pool import BlockPool
from cluster.engine.kv_manager import BlockTable, KVManager
from mixtral.attention import AttentionWeights, attention
from mixtral.kv_cache import PagedKVCache
from mixtral.kv_spec import KVSpec
from mixtral.layers import apply_rope, rope_cos_sin
from mixtral.layout import build_layout

BS = 4  # tokens per block in these cases
# name: blocks, first_block, starts, lengths, window
CASES: dict[str, tuple[list[list[int]], list[int], list[int], list[int], int | None]] = {
    "fresh prompts": ([[3, 0], [5], [1]], [0, 0, 0], [0, 0, 0], [5, 2, 3], None),
    "continued chunks": ([[2, 7, 4], [6]], [0, 0], [6, 1], [4, 2], None),
    "decodes at different positions": ([[0, 1, 2], [9], [4, 8, 3, 5]], [0, 0, 0], [9, 0, 14], [1, 1, 1], None),
    "a decode beside a chunk": ([[3, 1], [0, 2]], [0, 0], [7, 2], [1, 5], None),
    "decodes past recycled blocks": ([[6, 2, 9], [4, 1]], [1, 0], [13, 3], [1, 1], 8),
    "chunks past recycled blocks": ([[0, 1, 7, 8], [5, 2, 3, 11, 10]], [0, 3], [10, 21], [3, 11], 8),
}


@pytest.mark.parametrize("case", CASES)
def test_layout_matches_loops_over_positions(case: str) -> None:
    blocks, first_block, starts, lengths, window = CASES[case]
    layout = build_layout(
        blocks=blocks, first_block=first_block, starts=starts, lengths=lengths, block_size=BS, window=window, dtype=torch.float32
    )
    q_len, first = max(lengths), [sum(lengths[:b]) for b in range(len(lengths))]

    def slot(b: int, position: int) -> int:
        return blocks[b][position // BS - first_block[b]] * BS + position % BS

    assert layout.positions.tolist() == [p for s, n in zip(starts, lengths) for p in range(s, s + n)]
    assert layout.q_valid.tolist() == [[i < n for i in range(q_len)] for n in lengths]
    assert layout.q_index.tolist() == [[f + i if i < n else 0 for i in range(q_len)] for f, n in zip(first, lengths)]
    assert layout.write_slots.tolist() == [slot(b, p) for b, (s, n) in enumerate(zip(starts, lengths)) for p in range(s, s + n)]

    in_block = torch.arange(layout.block_size)
    keys = (layout.key_blocks[:, None] * layout.block_size + in_block).view(len(blocks), -1)  # each key's slot
    assert layout.bias.shape == (len(blocks), 1, q_len, keys.shape[1])
    for b, (s, n) in enumerate(zip(starts, lengths)):
        for i in range(n):
            q = s + i
            seen = [int(k) for k, ok in zip(keys[b], layout.bias[b, 0, i] == 0) if ok]
            # Each position of the query's window exactly once, from the slot it was written to.
            lowest = 0 if window is None else max(0, q - window + 1)
            assert seen == [slot(b, p) for p in range(lowest, q + 1)], (b, i)


def test_every_tensor_of_a_layout_moves_to_the_coordinators_device() -> None:
    blocks, first_block, starts, lengths, window = CASES["a decode beside a chunk"]
    layout = build_layout(
        blocks=blocks, first_block=first_block, starts=starts, lengths=lengths, block_size=BS, window=window, dtype=torch.float32
    )
    moved = layout.to("meta")  # a device with no data: any tensor left behind stays on the CPU
    tensors = {name: v for name, v in vars(moved).items() if isinstance(v, torch.Tensor)}
    assert len(tensors) == 6 and all(v.device.type == "meta" for v in tensors.values()), tensors.keys()
    assert moved.block_size == layout.block_size and moved.key_blocks.shape == layout.key_blocks.shape


def test_a_token_outside_its_block_table_is_refused_not_written() -> None:
    with pytest.raises(ValueError, match="block table"):
        build_layout(blocks=[[0]], first_block=[0], starts=[3], lengths=[2], block_size=BS, window=None, dtype=torch.float32)


H, G, DH, D, THETA = 4, 2, 8, 16, 10000.0


def reference_attention(x: torch.Tensor, w: tuple[torch.Tensor, ...], window: int | None) -> torch.Tensor:
    """Full causal GQA attention over a whole sequence x [L, D], from scratch."""
    wq, wk, wv, wo = w  # the checkpoint's [out, in] projections
    n = x.shape[0]
    cos, sin = rope_cos_sin(torch.arange(n), head_dim=DH, theta=THETA, dtype=torch.float32)
    q = apply_rope((x @ wq.T).view(n, H, DH), cos, sin)
    k = apply_rope((x @ wk.T).view(n, G, DH), cos, sin)
    v = (x @ wv.T).view(n, G, DH)
    pos = torch.arange(n)
    allowed = pos[None, :] <= pos[:, None]  # [query, key]
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    heads = []
    for h in range(H):
        g = h // (H // G)
        scores = (q[:, h] @ k[:, g].T) / DH**0.5
        heads.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, g])
    return torch.cat(heads, dim=1) @ wo.T


# (model dtype, the dtype of the GEMMs over the cache, tolerance): bf16 with float32 GEMMs is what a
# CPU without fast bf16 matmul runs (workers.device.matmul_dtype); bf16's resolution is 2**-8.
DTYPES = {
    "float32": (torch.float32, None, 1e-5),
    "bf16, float32 gemms": (torch.bfloat16, torch.float32, 2e-2),
    "bf16": (torch.bfloat16, None, 2e-2),
}


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("window", [None, 5])
def test_chunked_prefill_and_decode_through_the_paged_cache_match_full_attention(window: int | None, dtypes: str) -> None:
    dtype, score_dtype, tolerance = DTYPES[dtypes]
    g = torch.Generator().manual_seed(0)
    projections = (
        (torch.randn(H * DH, D, generator=g) / D**0.5).to(dtype),  # q
        (torch.randn(G * DH, D, generator=g) / D**0.5).to(dtype),  # k
        (torch.randn(G * DH, D, generator=g) / D**0.5).to(dtype),  # v
        (torch.randn(D, H * DH, generator=g) / (H * DH) ** 0.5).to(dtype),  # o
    )
    w = AttentionWeights.of(*projections)
    cache = PagedKVCache(KVSpec(1, G, DH, 4, block_size=BS), 12, dtype=dtype)
    # Stale keys in free blocks must never be attended to.
    cache.k[0].normal_(0, 100, generator=g)
    cache.v[0].normal_(0, 100, generator=g)
    kv = KVManager(BlockPool(12), block_size=BS, window=window, prefix_caching=False)
    kv.pool.allocate(5)  # the sequences' blocks start mid-pool and are not consecutive
    tables = [BlockTable(), BlockTable()]
    # Two prompts (11 and 7 tokens) in two chunks each, then decode steps, the window recycling blocks.
    steps = [[6, 4], [5, 3], [1, 1], [1, 1], [1, 1], [1, 1]]
    xs = [torch.randn(sum(step[b] for step in steps), D, generator=g).to(dtype) for b in range(2)]
    outputs: list[list[torch.Tensor]] = [[], []]
    starts = [0, 0]
    for lengths in steps:
        for table, s, n in zip(tables, starts, lengths):
            assert kv.room(table, s) >= n
            kv.allocate(table, s, n)
        layout = build_layout(
            blocks=[t.blocks for t in tables],
            first_block=[t.first_block for t in tables],
            starts=starts,
            lengths=lengths,
            block_size=BS,
            window=window,
            dtype=dtype,
        )
        rope = rope_cos_sin(layout.positions, head_dim=DH, theta=THETA, dtype=dtype)
        x = torch.cat([xs[b][s : s + n] for b, (s, n) in enumerate(zip(starts, lengths))])
        out = attention(
            x, w, layout, cache.k[0], cache.v[0], rope, num_heads=H, num_kv_heads=G, head_dim=DH, score_dtype=score_dtype
        )
        assert out.dtype == dtype
        for b, part in enumerate(out.split(lengths)):
            outputs[b].append(part)
        starts = [s + n for s, n in zip(starts, lengths)]
        for table, s in zip(tables, starts):
            kv.after_step(table, [], s)
    # With the window, blocks wholly behind it went back: each sequence holds at most its bound.
    most = cache.spec.blocks_per_sequence(max(starts), window)
    assert [len(t.blocks) for t in tables] == [most if window else 4, most if window else 3]
    for b in range(2):
        expected = reference_attention(xs[b].float(), tuple(m.float() for m in projections), window)
        torch.testing.assert_close(torch.cat(outputs[b]).float(), expected, rtol=tolerance, atol=tolerance)
