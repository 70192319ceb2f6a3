"""A failure stays with its request: odd sampling fields, a failing row, a full queue, a dead loop."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.block_pool import BlockPool
from cluster.engine.build import local_engine
from cluster.engine.core import EngineCore
from cluster.engine.kv_manager import KVManager
from cluster.engine.protocol import EngineOverloaded, EngineUnavailable, TokenEvent
from cluster.engine.sampling import SamplingParams
from cluster.engine.scheduler import SequenceState
from mixtral.checkpoint import Checkpoint
from tests.test_parity import random_prompts

ODD = [
    SamplingParams(max_tokens=6, temperature=1e-300, ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=5e-324, ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-300, seed=1, ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=1.0, seed=2**64 - 1, ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=1.0, seed=-(2**63), ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=0.7, top_k=10**6, top_p=0.5, seed=3, ignore_eos=True),
]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(make_ckpt) -> Checkpoint:  # type: ignore[no-untyped-def]
    return Checkpoint.open(make_ckpt())


def test_odd_sampling_fields_batched_with_greedy_requests_fail_nobody(checkpoint: Checkpoint) -> None:
    prompts = random_prompts([5, 9, 3, 7, 4, 6, 8, 5], 512, seed=21)
    alone = local_engine(checkpoint).generate(prompts[:2], [GREEDY, GREEDY])
    seqs = local_engine(checkpoint).generate(prompts, [GREEDY, GREEDY, *ODD])
    assert [s.finish_reason for s in seqs] == ["length"] * len(prompts)
    assert [s.output_ids for s in seqs[:2]] == [s.output_ids for s in alone]
    # Below the greedy floor is greedy: the same tokens as temperature 0 for the same prompt.
    [as_greedy] = local_engine(checkpoint).generate([prompts[2]], [GREEDY])
    assert seqs[2].output_ids == as_greedy.output_ids
    assert all(0 <= t < 512 for s in seqs for t in s.output_ids)


def test_a_row_whose_sampling_fails_ends_alone_with_an_error(checkpoint: Checkpoint) -> None:
    engine = local_engine(checkpoint)
    prompts = random_prompts([6, 4, 5], 512, seed=22)
    seqs = [engine.add_request(p, GREEDY) for p in prompts]
    bad = engine.add_request(prompts[1], SamplingParams(max_tokens=6, temperature=1.0, seed=1))
    # Past every check: a NaN temperature makes sampling itself raise, inside the shared step.
    bad.params = dataclasses.replace(bad.params, temperature=float("nan"))
    while engine.has_unfinished():
        engine.step()
    assert bad.finish_reason == "error" and bad.output_ids == []
    assert [s.finish_reason for s in seqs] == ["length"] * 3
    assert [s.output_ids for s in seqs] == [s.output_ids for s in local_engine(checkpoint).generate(prompts, [GREEDY] * 3)]
    assert engine.kv.num_free == engine.kv.num_blocks  # the failed sequence's blocks went back too


class SlowModel:
    """A step model that takes `delay` seconds a step and dies (SystemExit) on step `die_at`."""

    def __init__(self, delay: float = 0.0, die_at: int | None = None) -> None:
        self.max_model_len, self.vocab_size, self.delay, self.die_at, self.steps = 64, 50, delay, die_at, 0
        self.stepping = threading.Event()

    def forward(
        self, tokens: list[list[int]], *, starts: list[int], blocks: list[list[int]], first_block: list[int]
    ) -> torch.Tensor:
        self.steps += 1
        self.stepping.set()
        if self.steps == self.die_at:
            raise SystemExit("the loop thread is gone")
        threading.Event().wait(self.delay)
        return torch.zeros(len(tokens), self.vocab_size)


def async_engine(model: SlowModel, *, max_num_seqs: int = 8, max_waiting: int | None = None) -> AsyncEngine:
    kv = KVManager(BlockPool(64), block_size=16, window=None)
    return AsyncEngine(EngineCore(model, kv, eos_token_ids=(), max_num_seqs=max_num_seqs), max_waiting=max_waiting)


async def collect(engine: AsyncEngine, request_id: str, max_tokens: int = 5) -> list[TokenEvent]:
    return [e async for e in engine.stream([1, 2, 3], dataclasses.replace(GREEDY, max_tokens=max_tokens), request_id)]


def test_a_full_waiting_queue_refuses_new_requests_and_loses_none() -> None:
    engine = async_engine(SlowModel(delay=0.05), max_num_seqs=1, max_waiting=2)

    async def main() -> tuple[list[list[TokenEvent]], BaseException | None]:
        first = asyncio.create_task(collect(engine, "a"))
        while engine.engine.steps == 0:
            await asyncio.sleep(0.01)  # "a" is running
        queued = [asyncio.create_task(collect(engine, rid)) for rid in ("b", "c")]
        while engine.queued() < 2:
            await asyncio.sleep(0.01)
        try:
            await collect(engine, "d")
            refused = None
        except EngineOverloaded as e:
            refused = e
        return await asyncio.gather(first, *queued), refused

    finished, refused = asyncio.run(main())
    assert isinstance(refused, EngineOverloaded) and "retry" in str(refused)
    assert [[e.finish_reason for e in events][-1] for events in finished] == ["length"] * 3
    assert all(len(events) == 5 for events in finished)
    engine.shutdown()


def test_a_dead_loop_fails_open_streams_and_health_at_once() -> None:
    model = SlowModel(delay=0.01, die_at=3)
    engine = async_engine(model)

    async def main() -> list[TokenEvent]:
        return await collect(engine, "a", max_tokens=10)

    events = asyncio.run(main())
    assert events[-1].finish_reason == "error" and len(events) == 3  # two tokens, then the error
    engine._thread.join(10)
    assert not engine.is_alive()
    with pytest.raises(EngineUnavailable):
        asyncio.run(main())


def test_failures_outside_the_model_fail_the_running_requests_and_the_waiting_one_still_runs() -> None:
    engine = async_engine(SlowModel(delay=0.01), max_num_seqs=1)
    scheduler, armed, failures = engine.engine.scheduler, threading.Event(), [0]
    schedule = scheduler.schedule

    def schedule_or_fail() -> list[tuple[SequenceState, int]]:
        if armed.is_set() and scheduler.running and failures[0] < 2:
            failures[0] += 1
            raise RuntimeError("a fault in the engine's own bookkeeping")
        return schedule()

    scheduler.schedule = schedule_or_fail  # type: ignore[method-assign]

    async def main() -> list[list[TokenEvent]]:
        first = asyncio.create_task(collect(engine, "a", max_tokens=10))
        while engine.engine.steps == 0:
            await asyncio.sleep(0.01)  # "a" holds the one place
        queued = [asyncio.create_task(collect(engine, rid)) for rid in ("b", "c")]
        while engine.queued() < 2:
            await asyncio.sleep(0.01)
        armed.set()  # "a" fails, then "b" once it runs; nothing new arrives to wake the loop for "c"
        return await asyncio.wait_for(asyncio.gather(first, *queued), 30)

    a, b, c = asyncio.run(main())
    assert a[-1].finish_reason == b[-1].finish_reason == "error"
    assert [e.finish_reason for e in c] == [None] * 4 + ["length"]
    assert engine.is_alive()
    engine.shutdown()
