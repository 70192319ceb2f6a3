"""The engine loop over a fake model: token budget, chunked prefill, batching, finishing, aborts, request
checks, and scheduling by KV blocks: admission, preemption with recompute, prefix caching."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from cluster.engine.block_pool import BlockPool
from cluster.engine.core import EngineCore
from cluster.engine.kv_manager import KVManager
from cluster.engine.sampling import SamplingParams
from cluster.engine.scheduler import check_request
from cluster.errors import UserError

V = 50


@dataclass
class Call:
    tokens: list[list[int]]
    starts: list[int]
    blocks: list[list[int]]


@dataclass
class CountingModel:
    """Next token = last fed token + 1 (mod V); records every step."""

    max_model_len: int = 64
    vocab_size: int = V
    calls: list[Call] = field(default_factory=list)

    def forward(
        self, tokens: list[list[int]], *, starts: list[int], blocks: list[list[int]], first_block: list[int]
    ) -> torch.Tensor:
        assert first_block == [0] * len(tokens)  # no window here
        self.calls.append(Call(tokens, starts, [list(b) for b in blocks]))
        logits = torch.zeros(len(tokens), self.vocab_size)
        logits[torch.arange(len(tokens)), torch.tensor([(t[-1] + 1) % self.vocab_size for t in tokens])] = 5.0
        return logits


def make_engine(
    num_blocks: int = 128, max_model_len: int = 64, eos: int = 0, prefix_caching: bool = True, **options: int
) -> tuple[EngineCore[CountingModel], KVManager]:
    kv = KVManager(BlockPool(num_blocks), block_size=4, window=None, prefix_caching=prefix_caching)
    return EngineCore(CountingModel(max_model_len=max_model_len), kv, eos_token_ids=(eos,), **options), kv


def fed_tokens(calls: list[Call]) -> list[list[int]]:
    """Each sequence's fed tokens, in feeding order, checking that every feed continues where the last one ended.

    A sequence is known by its first block; a feed from position 0 starts a new record (a new sequence,
    or a preempted one recomputed).
    """
    fed: dict[int, list[int]] = {}
    done: list[list[int]] = []
    for call in calls:
        for tokens, start, blocks in zip(call.tokens, call.starts, call.blocks):
            if start == 0 and blocks[0] in fed:
                done.append(fed.pop(blocks[0]))
            assert start == len(fed.setdefault(blocks[0], [])), "a feed must continue where the last ended"
            fed[blocks[0]] += tokens
    return done + list(fed.values())


def greedy(max_tokens: int, *, ignore_eos: bool = False, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids)


def test_greedy_outputs_follow_the_model_and_every_token_is_fed_once_in_order() -> None:
    engine, kv = make_engine()
    prompts = [[3, 7, 9], [47], [20] * 5]
    seqs = engine.generate(prompts, [greedy(6), greedy(4), greedy(2)])
    assert [s.output_ids for s in seqs] == [[10, 11, 12, 13, 14, 15], [48, 49, 0], [21, 22]]
    assert [s.finish_reason for s in seqs] == ["length", "stop", "length"]  # 0 is eos
    assert kv.num_free == 128
    logprob = 5.0 - torch.logsumexp(torch.tensor([5.0] + [0.0] * (V - 1)), 0)
    torch.testing.assert_close(torch.tensor(seqs[0].logprobs), logprob.expand(6), rtol=1e-6, atol=1e-6)
    assert sorted(fed_tokens(engine.model.calls)) == sorted(p + s.output_ids[:-1] for p, s in zip(prompts, seqs))


def test_the_token_budget_splits_long_prompts_into_chunks_and_decodes_go_first() -> None:
    engine, _ = make_engine(max_num_batched_tokens=8)
    short, long = engine.generate([[1, 2], list(range(1, 31))], [greedy(10), greedy(2)])
    calls = engine.model.calls
    assert all(sum(map(len, c.tokens)) <= 8 for c in calls)
    assert [len(t) for t in calls[0].tokens] == [2, 6]
    # While the long prompt prefills in chunks, the short sequence decodes a token every step, first.
    for step, c in enumerate(calls[1:4]):
        assert c.tokens[0] == [short.output_ids[step]] and [len(t) for t in c.tokens] == [1, 7]
    assert [c.starts[1] for c in calls[:5]] == [0, 6, 13, 20, 27]
    assert [len(t) for t in calls[4].tokens] == [1, 3]
    assert short.output_ids == list(range(3, 13)) and long.output_ids == [31, 32]


def test_at_most_max_num_seqs_run_and_waiting_requests_join_as_others_finish() -> None:
    engine, kv = make_engine(max_num_seqs=2)
    seqs = [engine.add_request([10 * i + 1], greedy(n)) for i, n in enumerate([2, 5, 3, 1])]
    joined_at: dict[str, int] = {}
    finished_at: dict[str, int] = {}
    while engine.has_unfinished():
        step = engine.steps
        assert len(engine.scheduler.running) <= 2
        for seq in engine.step():
            joined_at.setdefault(seq.request_id, step)
            if seq.finished:
                finished_at[seq.request_id] = step
        assert len(engine.model.calls[-1].tokens) <= 2
    ids = [s.request_id for s in seqs]
    assert [joined_at[i] for i in ids] == [0, 0, finished_at[ids[0]] + 1, finished_at[ids[2]] + 1]
    assert [len(s.output_ids) for s in seqs] == [2, 5, 3, 1] and kv.num_free == 128


def test_finish_reasons() -> None:
    engine, _ = make_engine(max_model_len=12, eos=5)
    length, eos, ignored, stop_id, full = engine.generate(
        [[1], [2], [2], [2, 2], [1, 2, 3, 4, 20]],
        [greedy(3), greedy(8), greedy(8, ignore_eos=True), greedy(8, ignore_eos=True, stop_token_ids=(4, 9)), greedy(7)],
    )
    assert (length.output_ids, length.finish_reason) == ([2, 3, 4], "length")
    assert (eos.output_ids, eos.finish_reason) == ([3, 4, 5], "stop")
    assert (ignored.output_ids, ignored.finish_reason) == ([3, 4, 5, 6, 7, 8, 9, 10], "length")
    assert (stop_id.output_ids, stop_id.finish_reason) == ([3, 4], "stop")
    # Filling the context exactly: never a token fed at position max_model_len or beyond.
    assert (full.num_tokens, full.finish_reason) == (12, "length")
    assert all(s + len(t) <= 12 for c in engine.model.calls for s, t in zip(c.starts, c.tokens))


def test_abort_of_a_waiting_and_of_a_running_request_frees_its_blocks() -> None:
    engine, kv = make_engine(max_num_seqs=1)
    a = engine.add_request([1, 2], greedy(10), request_id="a")
    b = engine.add_request([3], greedy(2), request_id="b")
    c = engine.add_request([4], greedy(2), request_id="c")
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["a"] and kv.num_free == 127
    engine.abort("c")
    engine.abort("a")
    assert (a.finish_reason, c.finish_reason, kv.num_free) == ("abort", "abort", 128)
    while engine.has_unfinished():
        engine.step()
    assert [call.tokens for call in engine.model.calls[1:]] == [[[3]], [[4]]]  # only b ran after the aborts
    assert (b.output_ids, b.finish_reason, kv.num_free) == ([4, 5], "length", 128)


def test_check_request_rejects_what_the_model_cannot_run() -> None:
    def check(prompt: list[int], max_tokens: int = 4) -> None:
        check_request(prompt, greedy(max_tokens), max_model_len=16, vocab_size=V)

    check([0, V - 1], max_tokens=14)  # exactly the context, first and last ids: fine
    for prompt, max_tokens, message in [
        ([], 4, "empty"),
        ([1] * 10, 7, "exceeds"),
        ([1, V], 4, "vocabulary"),
        ([-1], 4, "vocabulary"),
    ]:
        with pytest.raises(UserError, match=message):
            check(prompt, max_tokens)


def test_generate_queues_nothing_when_one_request_is_bad() -> None:
    engine, kv = make_engine()
    with pytest.raises(UserError):
        engine.generate([[1, 2], [3, V]], [greedy(2), greedy(2)])
    assert not engine.has_unfinished() and engine.model.calls == [] and kv.num_free == 128


def test_when_blocks_run_out_the_newest_sequence_is_preempted_and_recomputed_and_none_fails() -> None:
    # 6 blocks of 4 tokens; each request grows to 18 tokens (5 blocks): one runs alone at its end.
    engine, kv = make_engine(num_blocks=6, max_model_len=24, prefix_caching=False)  # recompute in full
    prompts = [[10 * i + 1] * 6 for i in range(4)]
    seqs = [engine.add_request(p, greedy(12)) for p in prompts]
    while engine.has_unfinished():
        running, preempted = list(engine.scheduler.running), engine.scheduler.preemptions
        engine.step()
        # Every block is held by one running sequence or free; a waiting sequence holds none.
        held = [b for seq in engine.scheduler.running for b in seq.table.blocks]
        assert len(set(held)) == len(held) and len(held) + kv.num_free == 6
        assert not any(seq.table.blocks for seq in engine.scheduler.waiting)
        if engine.scheduler.preemptions > preempted:  # the most recently admitted went back, first in line
            assert engine.scheduler.waiting[0] is running[-1]
    assert engine.scheduler.preemptions > 0 and kv.num_free == 6
    big, _ = make_engine(num_blocks=64, max_model_len=24)
    assert [s.output_ids for s in seqs] == [s.output_ids for s in big.generate(prompts, [greedy(12)] * 4)]
    # A preempted sequence is fed again from position 0 with its outputs so far, then goes on.
    records = fed_tokens(engine.model.calls)
    assert len(records) == 4 + engine.scheduler.preemptions
    for seq in seqs:
        mine = [r for r in records if r[:6] == seq.prompt_ids]
        assert max(mine, key=len) == seq.prompt_ids + seq.output_ids[:-1]
        assert all(r == seq.tokens[: len(r)] for r in mine)


def test_a_prompt_chunk_takes_only_the_blocks_that_are_free() -> None:
    engine, kv = make_engine(num_blocks=8, max_model_len=32, max_num_batched_tokens=64)
    first = engine.add_request([1] * 20, greedy(4))  # 5 blocks, then a 6th for its decodes
    engine.step()
    second = engine.add_request([2] * 20, greedy(4))
    engine.step()
    # 2 blocks free, 1 kept back (watermark) beside a running sequence: a 4-token chunk.
    assert engine.model.calls[-1].tokens[1] == [2] * 4 and engine.scheduler.preemptions == 0
    while engine.has_unfinished():
        engine.step()
    assert (first.output_ids, second.output_ids, kv.num_free) == ([2, 3, 4, 5], [3, 4, 5, 6], 8)


def test_a_shared_prefix_is_prefilled_once_and_outputs_are_unchanged() -> None:
    system = list(range(20, 33))  # 13 tokens: 3 full blocks of 4
    prompts = [system + [1, 2], system + [7]]
    outputs = []
    for caching in (True, False):
        engine, kv = make_engine(prefix_caching=caching)
        outputs.append([engine.generate([p], [greedy(3)])[0].output_ids for p in prompts])
        second = engine.model.calls[-3]  # the second request's prefill (then two decodes)
        assert second.tokens == [prompts[1][12:] if caching else prompts[1]]
        assert second.starts == [12 if caching else 0]
        assert (kv.prefix.queried_tokens, kv.prefix.hit_tokens) == ((15 + 14, 12) if caching else (15 + 14, 0))
    assert outputs[0] == outputs[1]


@dataclass
class FailingModel(CountingModel):
    """A CountingModel whose steps numbered in `fail_at` (from 1, failed ones counted) raise."""

    fail_at: tuple[int, ...] = ()
    attempts: int = 0

    def forward(
        self, tokens: list[list[int]], *, starts: list[int], blocks: list[list[int]], first_block: list[int]
    ) -> torch.Tensor:
        self.attempts += 1
        if self.attempts in self.fail_at:
            raise RuntimeError(f"step {self.attempts} fails")
        return super().forward(tokens, starts=starts, blocks=blocks, first_block=first_block)


def test_a_failed_step_preempts_its_sequences_and_each_runs_alone_before_joining_the_batch_again() -> None:
    kv = KVManager(BlockPool(128), block_size=4, window=None, prefix_caching=False)  # recompute in full
    engine = EngineCore(FailingModel(fail_at=(3,)), kv, eos_token_ids=(0,))
    prompts = [[3, 7, 9], [21], [30] * 5]
    seqs = engine.generate(prompts, [greedy(6), greedy(6), greedy(6)])
    assert [s.output_ids for s in seqs] == [s.output_ids for s in make_engine()[0].generate(prompts, [greedy(6)] * 3)]
    calls = engine.model.calls
    assert [len(c.tokens) for c in calls] == [3, 3, 1, 1, 1, 3, 3, 3]  # the third step failed
    # Each alone, oldest first, recomputed from position 0 with the outputs it has streamed so far.
    assert [(c.starts, c.tokens) for c in calls[2:5]] == [([0], [s.tokens[:-4]]) for s in seqs]
    assert (engine.stats()["failed_steps"], engine.scheduler.preemptions, kv.num_free) == (1, 0, 128)
