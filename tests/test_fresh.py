"""Fresh: the snapshot /metrics, /health and the fleet views answer from, refreshed at most once a period."""

from __future__ import annotations

import asyncio

import pytest

from cluster.serve.fresh import Fresh


def test_a_burst_of_callers_costs_one_computation_a_period_and_failures_are_kept_as_long() -> None:
    now = [0.0]
    calls = []

    async def compute() -> int:
        calls.append(now[0])
        await asyncio.sleep(0.01)  # callers arrive while it runs
        if len(calls) == 2:
            raise RuntimeError("a worker did not answer")
        return len(calls)

    fresh = Fresh(compute, max_age_s=1.0, clock=lambda: now[0])

    async def scrape_loop() -> None:
        assert await asyncio.gather(*(fresh.get() for _ in range(50))) == [1] * 50  # one computation for all
        now[0] = 0.99
        assert await fresh.get() == 1  # still fresh
        now[0] = 1.0
        for _ in range(3):  # the failure is the answer until it is a period old
            with pytest.raises(RuntimeError, match="did not answer"):
                await fresh.get()
        now[0] = 2.5
        assert await fresh.get() == 3

    asyncio.run(scrape_loop())
    assert calls == [0.0, 1.0, 2.5]
