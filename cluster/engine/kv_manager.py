"""Block tables: which blocks of the pool hold each sequence's keys and values.

A sequence holds the blocks of its logical blocks first_block, first_block + 1, ...; position p is
in logical block p // block_size. With a sliding window W the next query, at position c (c tokens
cached), reads keys from c - W + 1 on, so blocks wholly before that go back to the pool after each
step: fed a token at a time, a sequence holds at most W tokens plus a block (the Mistral 7B paper's rolling
buffer, in blocks); a prompt chunk adds the blocks of its own tokens for its step.

Prefix caching: every full block is keyed by a hash chained over its tokens and all tokens before
it, so equal keys mean equal keys and values in every layer. A new sequence takes the longest run of
cached blocks its next query needs and prefills only the rest; the last prompt token is always
computed, since its logits give the first output token.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

from cluster.engine.block_pool import BlockPool


@dataclass(eq=False)
class BlockTable:
    blocks: list[int] = field(default_factory=list)  # physical blocks of logical blocks first_block, first_block + 1, ...
    first_block: int = 0
    hashes: list[bytes] = field(default_factory=list)  # prefix hash of each full block of the sequence's tokens so far
    registered: int = 0  # full blocks already offered to the prefix cache

    @property
    def end_block(self) -> int:
        return self.first_block + len(self.blocks)


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens of admitted sequences
    hit_tokens: int = 0  # of those, served from the prefix cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class KVManager:
    def __init__(self, pool: BlockPool, *, block_size: int, window: int | None, prefix_caching: bool = True) -> None:
        self.pool = pool
        self.block_size = block_size
        self.window = window
        self.prefix_caching = prefix_caching
        self.prefix = PrefixStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (vLLM's kv_cache_usage_perc); cached free blocks count as free."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def reach(self, position: int) -> int:
        """The first logical block a query at `position` reads."""
        return 0 if self.window is None else max(0, (position - self.window + 1) // self.block_size)

    def room(self, table: BlockTable, start: int, *, reserve: int = 0) -> int:
        """Tokens that can be fed from position `start` with the blocks held plus the free ones (less `reserve`)."""
        end = table.end_block if table.blocks else self.reach(start)
        return max(0, (end + self.pool.num_free - reserve) * self.block_size - start)

    def allocate(self, table: BlockTable, start: int, n: int) -> None:
        """Give the table blocks for positions start .. start + n - 1 (room() said they fit)."""
        if not table.blocks:
            table.first_block = self.reach(start)
        missing = (start + n - 1) // self.block_size + 1 - table.end_block
        if missing > 0:
            table.blocks += self.pool.allocate(missing)

    def match_prefix(self, table: BlockTable, tokens: list[int]) -> int:
        """Take the cached blocks of the longest usable prefix of `tokens`; return the tokens they hold."""
        assert not table.blocks, "only a sequence holding no blocks looks up its prefix"
        if not self.prefix_caching:
            return 0
        usable = (len(tokens) - 1) // self.block_size  # full blocks before the last token
        self._extend_hashes(table, tokens, usable)
        found = [self.pool.lookup(h) for h in table.hashes[:usable]]
        run = 0  # cached blocks in a row ending at block i - 1
        best = 0
        for i in range(1, usable + 1):
            run = run + 1 if found[i - 1] is not None else 0
            if i - self.reach(i * self.block_size) <= run:  # every block the next query reads is cached
                best = i
        if best == 0:
            return 0
        first = self.reach(best * self.block_size)
        blocks = [b for b in found[first:best] if b is not None]
        for block in blocks:
            self.pool.share(block)
        table.blocks, table.first_block, table.registered = blocks, first, best
        return best * self.block_size

    def count_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.prefix.queried_tokens += prompt_tokens
        self.prefix.hit_tokens += hit_tokens

    def after_step(self, table: BlockTable, tokens: list[int], num_cached: int) -> None:
        """Offer newly full blocks to the prefix cache, then free the blocks the window left behind."""
        full = num_cached // self.block_size
        if self.prefix_caching and full > table.registered:
            self._extend_hashes(table, tokens, full)
            for logical in range(max(table.registered, table.first_block), full):
                self.pool.register(table.blocks[logical - table.first_block], table.hashes[logical])
            table.registered = full
        behind = self.reach(num_cached) - table.first_block
        if behind > 0:
            self.pool.free(table.blocks[:behind])
            del table.blocks[:behind]
            table.first_block += behind

    def release(self, table: BlockTable) -> None:
        """Free every block (newest first, so a sequence's tail is evicted before its shareable head)."""
        self.pool.free(reversed(table.blocks))
        table.blocks, table.first_block, table.registered = [], 0, 0

    def _extend_hashes(self, table: BlockTable, tokens: list[int], blocks: int) -> None:
        size = self.block_size
        for i in range(len(table.hashes), blocks):
            parent = table.hashes[i - 1] if i else b""
            chunk = array("q", tokens[i * size : (i + 1) * size]).tobytes()
            table.hashes.append(hashlib.blake2b(parent + chunk, digest_size=16).digest())
