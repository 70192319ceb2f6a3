"""The engine (coordinator + experts, one process) against transformers' MixtralForCausalLM.

float32, eager attention, random checkpoints written by save_pretrained. Greedy ids identical and
logprobs within 1e-4, over expert counts, top-k, GQA ratios, a sliding window shorter than
prompt + output, and a batch of sequences of different lengths decoding together.
"""

from __future__ import annotations

import pytest
import torch

from cluster.engine.build import EngineOptions, local_engine
from cluster.engine.sampling import SamplingParams
from mixtral.checkpoint import Checkpoint
from tests.reference import hf_greedy, hf_model

SHAPES = {
    "8 experts top-2": {},
    "4 experts top-1": dict(num_local_experts=4, num_experts_per_tok=1),
    "6 experts top-3": dict(num_local_experts=6, num_experts_per_tok=3),
    "MHA (4/4 heads)": dict(num_key_value_heads=4),
    "MQA (4/1 heads)": dict(num_key_value_heads=1),
    "GQA 8/2 heads": dict(num_attention_heads=8, num_key_value_heads=2),
    "tied embeddings": dict(tie_word_embeddings=True),
    "sliding window 8": dict(sliding_window=8),
}


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def assert_matches_hf(checkpoint, prompts, max_tokens, options=EngineOptions(), expert_map=None, worker_threads=1):  # type: ignore[no-untyped-def]
    """The engine's greedy ids and logprobs against transformers'; returns the engine, for its stats."""
    engine = local_engine(Checkpoint.open(checkpoint), options, expert_map, worker_threads=worker_threads)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
    seqs = engine.generate(prompts, params)
    model = hf_model(checkpoint)
    for seq, prompt, n in zip(seqs, prompts, max_tokens):
        ref_ids, ref_logprobs = hf_greedy(model, prompt, n)
        assert seq.output_ids == ref_ids
        torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)
    return engine


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_matches_transformers(make_ckpt, shape: str) -> None:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(**SHAPES[shape])
    # Prompt + output (12 + 10) is longer than the sliding window (8): the rolling buffer wraps.
    assert_matches_hf(checkpoint, random_prompts([12, 5], 512, seed=1), [10, 7])


def test_batch_of_different_lengths_with_chunked_prefill(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(sliding_window=16)
    prompts = random_prompts([3, 9, 17, 30, 1], 512, seed=2)
    # A budget of 8 tokens a step forces long prompts into chunks, mixed with other sequences' decodes.
    assert_matches_hf(checkpoint, prompts, [12, 6, 9, 4, 20], EngineOptions(max_num_batched_tokens=8, max_num_seqs=3))


def test_two_micro_batches_in_flight_match_transformers(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(sliding_window=16)
    prompts = random_prompts([3, 9, 17, 30, 1, 6], 512, seed=9)
    # Every step of two or more sequences is split in two micro-batches, prefill and decode alike.
    assert_matches_hf(checkpoint, prompts, [12, 6, 9, 4, 20, 7], EngineOptions(overlap_min_tokens=2, max_num_batched_tokens=24))


def test_expert_load_counts_every_routed_token(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt()
    engine = local_engine(Checkpoint.open(checkpoint))
    prompts = random_prompts([7, 4], 512, seed=3)
    engine.generate(prompts, [SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)] * 2)
    load = engine.model.feed_forward.load.snapshot()
    # Every prompt token and every generated token but the last is fed once; each picks top-2 experts.
    fed = sum(len(p) + 5 - 1 for p in prompts)
    assert [sum(row) for row in load] == [fed * 2] * 2


def test_routing_trace_reads_back_the_live_counts(make_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from router.trace import read_trace

    checkpoint = make_ckpt()
    engine = local_engine(Checkpoint.open(checkpoint), EngineOptions(trace_path=str(tmp_path / "routes.msgpack")))
    engine.generate(random_prompts([9, 3, 14], 512, seed=4), [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)] * 3)
    trace = read_trace(tmp_path / "routes.msgpack")
    assert trace.counts == engine.model.feed_forward.load.snapshot()
    assert (trace.layers, trace.experts, trace.top_k, trace.truncated) == (2, 8, 2, False)
    assert trace.steps == engine.steps


def test_routing_trace_stops_at_its_size_bound(make_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from router.trace import read_trace

    path = tmp_path / "small.msgpack"
    engine = local_engine(Checkpoint.open(make_ckpt()), EngineOptions(trace_path=str(path), trace_max_bytes=400))
    engine.generate(random_prompts([30], 512, seed=4), [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)])
    assert path.stat().st_size <= 400
    trace = read_trace(path)
    assert trace.truncated and 0 < sum(map(sum, trace.counts)) < sum(map(sum, engine.model.feed_forward.load.snapshot()))  # type: ignore[attr-defined]


@pytest.mark.parametrize("window", [None, 12])
def test_preemption_and_prefix_hits_match_transformers(make_ckpt, window: int | None) -> None:  # type: ignore[no-untyped-def]
    from mixtral.kv_spec import GiB, KVSpec

    checkpoint = make_ckpt(**({"sliding_window": window} if window else {}))
    system = random_prompts([21], 512, seed=5)[0]  # one full 16-token block shared, and a partial one
    prompts = [system + p for p in random_prompts([3, 9, 1, 14], 512, seed=6)] + random_prompts([30], 512, seed=7)
    max_tokens = [12, 6, 16, 9, 10]
    spec = KVSpec.of(Checkpoint.open(checkpoint).args, "float32")
    # A sequence of max_model_len 64 needs 4 blocks (2 with the window); the batch needs more than these.
    blocks = {None: 4, 12: 5}[window]
    assert blocks >= spec.blocks_per_sequence(64, window)
    options = EngineOptions(kv_cache_memory_gb=spec.pool_bytes(blocks) / GiB, max_model_len=64)
    engine = local_engine(Checkpoint.open(checkpoint), options)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
    [first] = engine.generate(prompts[:1], params[:1])  # its blocks are cached for the rest
    seqs = [first, *engine.generate(prompts[1:], params[1:])]
    assert engine.kv.num_blocks == blocks and engine.scheduler.preemptions > 0
    # The shared block, for each of the three later prompts (counted at first admission only).
    assert engine.kv.prefix.hit_tokens >= 16 * 3 and engine.kv.prefix.queried_tokens == sum(map(len, prompts))
    assert engine.kv.num_free == blocks  # every block came back
    model = hf_model(checkpoint)
    for seq, prompt, n in zip(seqs, prompts, max_tokens):
        ref_ids, ref_logprobs = hf_greedy(model, prompt, n)
        assert seq.output_ids == ref_ids
        torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)


def test_a_second_chat_prefills_only_past_the_shared_system_prompt(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    from cluster.serve.chat import ChatRenderer

    path = make_ckpt(tokenizer=True, vocab_size=32000)
    renderer = ChatRenderer(path, guardrail=True)
    chats = [renderer.render([{"role": "user", "content": text}]) for text in ("What is a mixture of experts?", "Name a prime.")]
    shared = next(i for i, (a, b) in enumerate(zip(*chats)) if a != b)
    assert shared > 40  # the guardrail system prompt
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    seqs, prefilled = {}, {}
    for caching in (True, False):
        engine = local_engine(Checkpoint.open(path), EngineOptions(prefix_caching=caching))
        seqs[caching], prefilled[caching] = [], []
        for prompt in chats:
            before = sum(engine.model.feed_forward.load.snapshot()[0])  # layer 0: every fed token, top_k times
            seqs[caching] += engine.generate([prompt], [greedy])
            fed = (sum(engine.model.feed_forward.load.snapshot()[0]) - before) // engine.model.args.num_experts_per_tok
            prefilled[caching].append(fed - (greedy.max_tokens - 1))  # less the decoded tokens
    assert prefilled[False] == [len(c) for c in chats]
    # The second chat's prefill starts at the last whole 16-token block of the shared prefix.
    assert prefilled[True] == [len(chats[0]), len(chats[1]) - shared // 16 * 16]
    for cached, plain in zip(seqs[True], seqs[False]):
        assert cached.output_ids == plain.output_ids
        torch.testing.assert_close(torch.tensor(cached.logprobs), torch.tensor(plain.logprobs), rtol=0, atol=1e-4)
