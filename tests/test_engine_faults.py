"""A failed step costs a recompute, not a request: the real engine over a small checkpoint, with faults
injected into its model's forward.

A step that fails preempts the sequences in it (they are recomputed from their tokens, and what was
streamed stays as it was); only a sequence that fails again and again, alone, ends with an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.build import EngineOptions, local_engine
from cluster.engine.core import EngineCore
from cluster.engine.protocol import TokenEvent
from cluster.engine.sampling import SamplingParams
from cluster.engine.scheduler import MAX_STEP_FAILURES
from cluster.model_runner import ModelRunner
from mixtral.checkpoint import Checkpoint
from tests.test_parity import random_prompts

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
POISON = 2  # the first token of a prompt whose every step fails (random_prompts' tokens are >= 3)
DEADLINE_S = 30.0  # far above the tiny model's few steps: reached only when a request is stranded


@pytest.fixture(scope="module")
def checkpoint(make_ckpt) -> Checkpoint:  # type: ignore[no-untyped-def]
    return Checkpoint.open(make_ckpt())


class FaultyModel:
    """The real model runner, whose step raises on the calls in `fail_calls` and on every step that
    starts the prompt beginning with POISON. A failing step runs the real forward first, so its caches
    are written and its result is lost, as when an expert fails in the last layer.

    Until `gate` is set, a step waits, so that a test can line requests up behind it."""

    def __init__(self, runner: ModelRunner, *, fail_calls: tuple[int, ...] = (), gate: threading.Event | None = None) -> None:
        self.runner, self.fail_calls, self.gate = runner, fail_calls, gate
        self.max_model_len, self.vocab_size = runner.max_model_len, runner.vocab_size
        self.calls = 0
        self.failed: list[list[list[int]]] = []  # the tokens fed in each failed step

    def forward(
        self, tokens: list[list[int]], *, starts: list[int], blocks: list[list[int]], first_block: list[int]
    ) -> torch.Tensor:
        if self.gate is not None:
            self.gate.wait()
        self.calls += 1
        logits = self.runner.forward(tokens, starts=starts, blocks=blocks, first_block=first_block)
        if self.calls in self.fail_calls or any(s == 0 and t[0] == POISON for t, s in zip(tokens, starts)):
            self.failed.append(tokens)
            raise RuntimeError(f"injected fault in step {self.calls}")
        return logits


def faulty_engine(
    checkpoint: Checkpoint, *, max_num_seqs: int = 8, fail_calls: tuple[int, ...] = (), gate: threading.Event | None = None
) -> AsyncEngine:
    core = local_engine(checkpoint, EngineOptions(max_num_seqs=max_num_seqs))
    model = FaultyModel(core.model, fail_calls=fail_calls, gate=gate)
    engine = EngineCore(model, core.kv, eos_token_ids=core.eos_token_ids, max_num_seqs=max_num_seqs)
    return AsyncEngine(engine)


async def collect(engine: AsyncEngine, prompt: list[int], request_id: str) -> list[TokenEvent]:
    return [e async for e in engine.stream(prompt, GREEDY, request_id)]


def fault_free(checkpoint: Checkpoint, prompts: list[list[int]]) -> list[list[int]]:
    return [s.output_ids for s in local_engine(checkpoint).generate(prompts, [GREEDY] * len(prompts))]


def run_all(engine: AsyncEngine, prompts: list[list[int]], gate: threading.Event | None = None) -> list[list[TokenEvent]]:
    """Every request's events; fails if any stream is still open after DEADLINE_S. With a gate, the
    first step is held until every request has reached the engine."""

    async def main() -> list[list[TokenEvent]]:
        streams = [asyncio.create_task(collect(engine, p, f"r{i}")) for i, p in enumerate(prompts)]
        while gate is not None and len(engine.engine.scheduler.running) + engine.queued() < len(prompts):
            await asyncio.sleep(0.01)
        if gate is not None:
            gate.set()
        return await asyncio.gather(*streams)

    return asyncio.run(asyncio.wait_for(main(), DEADLINE_S))


def test_after_a_failed_step_the_waiting_request_runs_without_a_new_arrival(checkpoint: Checkpoint) -> None:
    gate = threading.Event()
    engine = faulty_engine(checkpoint, max_num_seqs=1, fail_calls=(1,), gate=gate)
    prompts = random_prompts([5, 7], 512, seed=31)
    events = run_all(engine, prompts, gate)  # the first step, which fails, holds the one place
    assert [[e.token_id for e in ev] for ev in events] == fault_free(checkpoint, prompts)
    assert [ev[-1].finish_reason for ev in events] == ["length", "length"]
    assert engine.is_alive()
    engine.shutdown()


def test_a_step_failed_mid_decode_costs_a_recompute_and_no_token(checkpoint: Checkpoint) -> None:
    gate = threading.Event()
    engine = faulty_engine(checkpoint, fail_calls=(4,), gate=gate)
    prompts = random_prompts([6, 4, 9], 512, seed=32)
    events = run_all(engine, prompts, gate)
    model = engine.engine.model
    assert isinstance(model, FaultyModel) and [list(map(len, t)) for t in model.failed] == [[1, 1, 1]]  # all decoding
    # What was streamed before the fault is neither sent again nor changed: each stream is the fault-free output.
    assert [[e.token_id for e in ev] for ev in events] == fault_free(checkpoint, prompts)
    assert all(e.finish_reason is None for ev in events for e in ev[:-1])
    assert [ev[-1].finish_reason for ev in events] == ["length"] * 3
    stats = engine.engine.stats()
    assert engine.is_alive() and stats["failed_steps"] == 1 and stats["running"] == stats["waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks"]
    engine.shutdown()


def test_a_request_whose_every_step_fails_ends_alone_with_an_error(checkpoint: Checkpoint) -> None:
    engine = faulty_engine(checkpoint)
    prompts = random_prompts([6, 4, 9], 512, seed=33)
    poison = [POISON, *random_prompts([5], 512, seed=34)[0]]
    events = run_all(engine, [prompts[0], poison, *prompts[1:]])
    bad = events.pop(1)
    assert [e.finish_reason for e in bad] == ["error"]  # no token: none of its steps ever succeeded
    assert [[e.token_id for e in ev] for ev in events] == fault_free(checkpoint, prompts)
    assert [ev[-1].finish_reason for ev in events] == ["length"] * 3
    stats = engine.engine.stats()
    # It failed MAX_STEP_FAILURES steps in a row (the last ones alone), and no other step failed.
    assert engine.is_alive() and stats["failed_steps"] == MAX_STEP_FAILURES
    assert stats["running"] == stats["waiting"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks"]
    engine.shutdown()


def test_generate_recovers_from_failed_steps_too(checkpoint: Checkpoint) -> None:
    core = local_engine(checkpoint)
    engine = EngineCore(FaultyModel(core.model, fail_calls=(3,)), core.kv, eos_token_ids=core.eos_token_ids)
    prompts = random_prompts([6, 4], 512, seed=35)
    poison = [POISON, 7, 8]
    seqs = engine.generate([*prompts, poison], [GREEDY, GREEDY, dataclasses.replace(GREEDY, max_tokens=2)])
    assert [s.finish_reason for s in seqs] == ["length", "length", "error"]
    assert [s.output_ids for s in seqs[:2]] == fault_free(checkpoint, prompts)
    assert engine.kv.num_free == engine.kv.num_blocks
