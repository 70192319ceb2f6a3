"""KV memory is a budget: the pool is allocated once at its size, long prompts and bursts beyond it are
served (by preemption, never failure), and a budget that cannot hold one sequence is refused up front."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.build import EngineOptions, check_kv_budget, local_engine
from cluster.engine.sampling import SamplingParams
from cluster.errors import UserError
from mixtral.checkpoint import Checkpoint
from mixtral.kv_spec import GiB, KVSpec
from mixtral.synthetic import cached_preset_checkpoint
from tests.test_parity import random_prompts

GREEDY = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(make_ckpt) -> Checkpoint:  # type: ignore[no-untyped-def]
    return Checkpoint.open(make_ckpt())  # 256 tokens of context


def test_a_prompt_of_max_model_len_on_tiny_is_served_within_the_budget(tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(cached_preset_checkpoint("tiny", cache_dir=tmp_path))
    spec = KVSpec.of(checkpoint.args, checkpoint.args.dtype)
    max_model_len = 1024  # of tiny's 4096, to keep the prefill short on two cores
    blocks = spec.blocks_per_sequence(max_model_len, checkpoint.args.sliding_window)
    budget = spec.pool_bytes(blocks) + spec.bytes_per_block - 1  # one sequence of max_model_len, and not another block
    engine = local_engine(checkpoint, EngineOptions(kv_cache_memory_gb=budget / GiB, max_model_len=max_model_len))
    cache = engine.model.cache
    tensors = [*cache.k, *cache.v]
    assert cache.num_blocks == blocks == 64 and cache.nbytes == spec.pool_bytes(blocks) <= budget
    [seq] = engine.generate(random_prompts([max_model_len - 1], checkpoint.args.vocab_size, seed=3), [GREEDY])
    assert seq.finish_reason == "length" and seq.num_tokens == max_model_len
    # The pool is the same memory, never grown or replaced, and every block came back.
    assert all(a is b for a, b in zip([*cache.k, *cache.v], tensors, strict=True))
    assert cache.nbytes <= budget and engine.kv.num_free == blocks


def test_64_concurrent_requests_beyond_the_pool_all_finish_with_the_same_tokens(checkpoint: Checkpoint) -> None:
    spec = KVSpec.of(checkpoint.args, "float32")
    prompts = random_prompts([8 + i % 24 for i in range(64)], 512, seed=4)
    params = [dataclasses.replace(GREEDY, max_tokens=12 + i % 9) for i in range(64)]
    need = sum(spec.blocks_per_sequence(len(p) + sp.max_tokens, None) for p, sp in zip(prompts, params))
    small = local_engine(checkpoint, EngineOptions(kv_cache_memory_gb=spec.pool_bytes(24) / GiB, max_model_len=128))
    assert need > 3 * small.kv.num_blocks  # far beyond what the pool holds at once
    engine = AsyncEngine(small)

    async def one(i: int) -> tuple[list[int], str | None]:
        events = [e async for e in engine.stream(prompts[i], params[i], f"r{i}")]
        return [e.token_id for e in events], events[-1].finish_reason

    async def burst() -> list[tuple[list[int], str | None]]:
        return await asyncio.gather(*(one(i) for i in range(64)))

    try:
        outcomes = asyncio.run(burst())
    finally:
        engine.shutdown()
    assert [reason for _, reason in outcomes] == ["length"] * 64
    assert small.scheduler.preemptions > 0 and small.kv.num_free == 24
    roomy = local_engine(checkpoint).generate(prompts, params)
    assert [tokens for tokens, _ in outcomes] == [s.output_ids for s in roomy]


def test_a_budget_that_cannot_hold_one_sequence_is_refused_with_the_numbers(checkpoint: Checkpoint) -> None:
    spec = KVSpec.of(checkpoint.args, "float32")
    options = EngineOptions(kv_cache_memory_gb=spec.pool_bytes(15) / GiB)  # 256 tokens need 16 blocks
    for attempt in (lambda: check_kv_budget(checkpoint.args, options), lambda: local_engine(checkpoint, options)):
        with pytest.raises(UserError, match=r"holds 15 blocks .* needs 16 blocks .*--kv-cache-memory .* --max-model-len to 240"):
            attempt()
    check_kv_budget(checkpoint.args, dataclasses.replace(options, max_model_len=240))  # the fix it names works


def test_gpu_memory_utilization_leaves_the_kv_cache_what_the_weights_left_of_the_share() -> None:
    from cluster.model_runner import gpu_kv_budget

    # A 24 GiB card whose weights took 10 GiB: 90% of it is 21.6 GiB, of which 11.6 are left for the cache.
    assert gpu_kv_budget(14 * GiB, 24 * GiB, 0.9) == pytest.approx(11.6 * GiB)
    assert gpu_kv_budget(14 * GiB, 24 * GiB, 1.0) == pytest.approx(14 * GiB)  # all of what is free
    assert gpu_kv_budget(14 * GiB, 24 * GiB, 0.4) == 0  # a share below the weights leaves nothing (then refused)
    assert gpu_kv_budget(14 * GiB, 24 * GiB, None) == pytest.approx(0.9 * 14 * GiB)  # not given: 90% of what is free
