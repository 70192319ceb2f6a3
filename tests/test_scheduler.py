"""The engine loop over a fake model: token budget, chunked prefill, batching, finishing, aborts, request checks."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from cluster.engine.sampling import SamplingParams
from cluster.engine.scheduler import Engine, check_request
from cluster.errors import UserError
from mixtral.kv_cache import KVCache

V = 50


@dataclass
class Call:
    tokens: list[list[int]]
    slots: list[int]
    starts: list[int]


@dataclass
class CountingModel:
    """Next token = last fed token + 1 (mod V); records every step."""

    max_model_len: int = 64
    vocab_size: int = V
    calls: list[Call] = field(default_factory=list)

    def forward(self, tokens: list[list[int]], *, slots: list[int], starts: list[int]) -> torch.Tensor:
        self.calls.append(Call(tokens, slots, starts))
        logits = torch.zeros(len(tokens), self.vocab_size)
        logits[torch.arange(len(tokens)), torch.tensor([(t[-1] + 1) % self.vocab_size for t in tokens])] = 5.0
        return logits


def make_engine(
    num_slots: int = 8, max_model_len: int = 64, eos: int = 0, **options: int
) -> tuple[Engine[CountingModel], KVCache]:
    cache = KVCache(num_layers=1, num_slots=num_slots, num_kv_heads=1, head_dim=1, max_capacity=16, dtype=torch.float32)
    return Engine(CountingModel(max_model_len=max_model_len), cache, eos_token_ids=(eos,), **options), cache


def greedy(max_tokens: int, *, ignore_eos: bool = False, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids)


def test_greedy_outputs_follow_the_model_and_every_token_is_fed_once_in_order() -> None:
    engine, cache = make_engine()
    prompts = [[3, 7, 9], [47], [20] * 5]
    seqs = engine.generate(prompts, [greedy(6), greedy(4), greedy(2)])
    assert [s.output_ids for s in seqs] == [[10, 11, 12, 13, 14, 15], [48, 49, 0], [21, 22]]
    assert [s.finish_reason for s in seqs] == ["length", "stop", "length"]  # 0 is eos
    assert cache.free_slots == 8
    logprob = 5.0 - torch.logsumexp(torch.tensor([5.0] + [0.0] * (V - 1)), 0)
    torch.testing.assert_close(torch.tensor(seqs[0].logprobs), logprob.expand(6), rtol=1e-6, atol=1e-6)
    fed: dict[int, list[int]] = {}
    for call in engine.model.calls:
        for tokens, slot, start in zip(call.tokens, call.slots, call.starts):
            assert start == len(fed.setdefault(slot, []))
            fed[slot] += tokens
    assert sorted(fed.values()) == sorted(p + s.output_ids[:-1] for p, s in zip(prompts, seqs))


def test_the_token_budget_splits_long_prompts_into_chunks_and_decodes_go_first() -> None:
    engine, _ = make_engine(max_num_batched_tokens=8)
    short, long = engine.generate([[1, 2], list(range(1, 31))], [greedy(10), greedy(2)])
    calls = engine.model.calls
    assert all(sum(map(len, c.tokens)) <= 8 for c in calls)
    assert [len(t) for t in calls[0].tokens] == [2, 6]
    # While the long prompt prefills in chunks, the short sequence decodes a token every step, first.
    for c in calls[1:4]:
        assert c.slots == [short.slot, long.slot] and [len(t) for t in c.tokens] == [1, 7]
    assert [c.starts[1] for c in calls[:5]] == [0, 6, 13, 20, 27]
    assert [len(t) for t in calls[4].tokens] == [1, 3]
    assert short.output_ids == list(range(3, 13)) and long.output_ids == [31, 32]


def test_at_most_max_num_seqs_run_and_waiting_requests_join_as_others_finish() -> None:
    engine, cache = make_engine(max_num_seqs=2)
    seqs = [engine.add_request([10 * i + 1], greedy(n)) for i, n in enumerate([2, 5, 3, 1])]
    joined_at: dict[str, int] = {}
    finished_at: dict[str, int] = {}
    while engine.has_unfinished():
        step = engine.steps
        assert len(engine.running) <= 2
        for seq in engine.step():
            joined_at.setdefault(seq.request_id, step)
            if seq.finished:
                finished_at[seq.request_id] = step
        assert len(engine.model.calls[-1].slots) <= 2
    ids = [s.request_id for s in seqs]
    assert [joined_at[i] for i in ids] == [0, 0, finished_at[ids[0]] + 1, finished_at[ids[2]] + 1]
    assert [len(s.output_ids) for s in seqs] == [2, 5, 3, 1] and cache.free_slots == 8


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


def test_abort_of_a_waiting_and_of_a_running_request_frees_its_slot() -> None:
    engine, cache = make_engine(num_slots=1)
    a = engine.add_request([1, 2], greedy(10), request_id="a")
    b = engine.add_request([3], greedy(2), request_id="b")
    c = engine.add_request([4], greedy(2), request_id="c")
    engine.step()
    assert [s.request_id for s in engine.running] == ["a"] and cache.free_slots == 0
    engine.abort("c")
    engine.abort("a")
    assert (a.finish_reason, c.finish_reason, cache.free_slots) == ("abort", "abort", 1)
    while engine.has_unfinished():
        engine.step()
    assert [call.tokens for call in engine.model.calls[1:]] == [[[3]], [[4]]]  # only b ran after the aborts
    assert (b.output_ids, b.finish_reason, cache.free_slots) == ([4, 5], "length", 1)


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
    engine, cache = make_engine()
    with pytest.raises(UserError):
        engine.generate([[1, 2], [3, V]], [greedy(2), greedy(2)])
    assert not engine.has_unfinished() and engine.model.calls == [] and cache.free_slots == 8
