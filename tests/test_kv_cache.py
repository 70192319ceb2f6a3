"""KV memory: what a budget buys, the block pool (references, LRU eviction of cached prefixes), block tables."""

from __future__ import annotations

import pytest
import torch

from cluster.engine.block_pool import BlockPool
from cluster.engine.kv_manager import BlockTable, KVManager
from mixtral.kv_cache import PagedKVCache
from mixtral.kv_spec import KVSpec


def test_the_pool_holds_exactly_the_blocks_the_budget_buys() -> None:
    spec = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype_bytes=4, block_size=16)
    assert spec.bytes_per_token == 2 * 3 * 2 * 8 * 4 and spec.bytes_per_block == 16 * spec.bytes_per_token
    budget = 10 * spec.bytes_per_block + spec.bytes_per_block - 1  # a block short of 11
    cache = PagedKVCache(spec, spec.blocks_in(budget), dtype=torch.float32)
    assert cache.num_blocks == 10 and cache.nbytes == spec.pool_bytes(10) <= budget
    assert all(t.shape == (2, 10 * 16, 8) for t in cache.k + cache.v)
    half = PagedKVCache(KVSpec(3, 2, 8, 2), 10, dtype=torch.bfloat16)
    assert half.nbytes == cache.nbytes // 2


@pytest.mark.parametrize("window", [None, 1, 5, 16, 17, 40])
def test_blocks_per_sequence_is_the_most_a_sequence_ever_holds(window: int | None) -> None:
    spec = KVSpec(1, 1, 1, 4, block_size=16)
    kv = KVManager(BlockPool(1000), block_size=16, window=window, prefix_caching=False)
    table, most = BlockTable(), 0
    for position in range(300):  # a token at a time, as the scheduler can always feed a sequence
        kv.allocate(table, position, 1)
        most = max(most, len(table.blocks))
        kv.after_step(table, [], position + 1)
        assert spec.blocks_per_sequence(position + 1, window) >= most
    assert spec.blocks_per_sequence(300, window) == most


def test_blocks_are_reference_counted_and_freed_blocks_are_reused_oldest_first() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2), pool.allocate(1)
    assert (a, b, pool.num_free) == ([0, 1], [2], 1)
    pool.share(a[0])  # a second sequence holds block 0 too
    pool.free(a)
    assert pool.num_free == 2  # block 1 is free, block 0 still held once
    pool.free([a[0]])
    assert pool.allocate(3) == [3, 1, 0]
    with pytest.raises(RuntimeError, match="free"):
        pool.allocate(1)


def test_cached_prefixes_are_kept_while_free_and_evicted_least_recently_freed_first() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for block, h in zip(blocks, [b"x", b"y", b"z"]):
        pool.register(block, h)
    pool.free([blocks[1], blocks[0], blocks[2]])  # freed in this order: y, x, z
    assert pool.num_free == 3 and pool.num_cached == 3
    pool.share(pool.lookup(b"x"))  # x is reused: out of the free queue, prefix kept
    assert pool.num_free == 2
    assert pool.allocate(1) == [blocks[1]]  # y, the least recently freed, is evicted
    assert (pool.lookup(b"y"), pool.lookup(b"x"), pool.lookup(b"z")) == (None, blocks[0], blocks[2])
    pool.register(blocks[1], b"x")  # a prefix already cached elsewhere keeps its block
    assert pool.lookup(b"x") == blocks[0]


def filled(kv: KVManager, tokens: list[int]) -> BlockTable:
    """A sequence that prefilled `tokens` and finished: its full blocks are cached."""
    table = BlockTable()
    kv.allocate(table, 0, len(tokens))
    kv.after_step(table, tokens, len(tokens))
    return table


def test_a_prefix_is_matched_block_by_block_and_the_last_token_is_always_computed() -> None:
    kv = KVManager(BlockPool(16), block_size=4, window=None)
    shared = list(range(100, 110))  # 2 full blocks and 2 tokens
    first = filled(kv, shared + [1, 2, 3])
    shared_blocks = first.blocks[:2]
    kv.release(first)

    same_start = BlockTable()
    assert kv.match_prefix(same_start, shared + [7, 8, 9, 10, 11]) == 8
    assert same_start.blocks == shared_blocks and same_start.first_block == 0
    exact = BlockTable()
    # 12 tokens cached (3 blocks), but the 12th token's logits are needed: only 2 blocks are taken.
    assert kv.match_prefix(exact, shared + [1, 2]) == 8
    assert kv.match_prefix(BlockTable(), [100, 101, 102, 999, 104]) == 0  # differs in the first block
    other = BlockTable()
    assert kv.match_prefix(other, [5] * 4 + shared) == 0  # same tokens at other positions: another prefix


def test_with_a_window_a_prefix_needs_only_the_blocks_its_next_query_reads() -> None:
    kv = KVManager(BlockPool(5), block_size=4, window=6)
    tokens = list(range(50, 70))  # 5 full blocks
    table = filled(kv, tokens)  # the window already freed blocks 0-2 (the query at 20 reads 15..20)
    kv.release(table)
    taken = kv.pool.allocate(3)  # evicts the least recently freed: logical blocks 0, 1, 2
    hit = BlockTable()
    # The query at 20 reads 15..20: logical blocks 3 and 4, both still cached.
    assert kv.match_prefix(hit, tokens + [1]) == 20
    assert (hit.first_block, len(hit.blocks)) == (3, 2)
    kv.release(hit)
    kv.pool.free(taken)
    kv.pool.allocate(5)  # now every block is evicted
    assert kv.match_prefix(BlockTable(), tokens + [1]) == 0
