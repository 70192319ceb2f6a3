"""The KV cache's blocks as the engine counts them.

A block is in use (held by one or more sequences, reference-counted), or free. A free block may
still hold a cached prefix, keyed by the hash of its tokens and everything before them, which a
later request can take back (prefix caching). Free blocks form one queue in the order they were
freed: allocation takes the oldest, forgetting whatever prefix it held, so cached prefixes are
evicted least recently used and never cost a block that a sequence needs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # prefix hash -> the block holding it
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks a sequence can get now, cached prefixes included (they are evicted on demand)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"{n} KV blocks asked for, {len(self._free)} free; the scheduler must check first")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each; a block nobody holds joins the free queue's tail (evicted last)."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    def lookup(self, prefix_hash: bytes) -> int | None:
        return self._cached.get(prefix_hash)

    def share(self, block: int) -> None:
        """Take a reference to a cached block, free or in use."""
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1

    def register(self, block: int, prefix_hash: bytes) -> None:
        """Offer a full block's contents for reuse. A prefix already cached in another block keeps that one."""
        if prefix_hash not in self._cached and self._hash_of[block] is None:
            self._cached[prefix_hash] = block
            self._hash_of[block] = prefix_hash

    def _forget(self, block: int) -> None:
        prefix_hash = self._hash_of[block]
        if prefix_hash is not None:
            del self._cached[prefix_hash]
            self._hash_of[block] = None
