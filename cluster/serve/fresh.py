"""A value kept fresh for a while: what an unauthenticated route answers from, so that a scrape loop
costs the replica at most one refresh a period however often it calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Fresh(Generic[T]):
    """`compute()`'s result, or the exception it raised, computed again at most once every `max_age_s`;
    callers that arrive while it is computed wait for that one computation."""

    def __init__(
        self, compute: Callable[[], Awaitable[T]], *, max_age_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.compute = compute
        self.max_age_s = max_age_s
        self.clock = clock
        self._lock = asyncio.Lock()
        self._at: float | None = None
        self._value: T | None = None
        self._error: BaseException | None = None

    async def get(self) -> T:
        async with self._lock:
            if self._at is None or self.clock() - self._at >= self.max_age_s:
                try:
                    self._value, self._error = await self.compute(), None
                except Exception as e:
                    self._value, self._error = None, e
                self._at = self.clock()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set with _at, and _error is None
