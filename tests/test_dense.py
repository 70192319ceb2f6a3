"""Dense Mistral through the same engine: transformers' MistralForCausalLM (float32, eager) is the reference.

Greedy ids identical and logprobs within 1e-4 over GQA and MHA, a sliding window shorter than
prompt + output, chunked prefill, preemption and prefix caching; no expert workers anywhere.
"""

from __future__ import annotations

import pytest

from cluster.engine.build import EngineOptions
from mixtral.checkpoint import Checkpoint
from mixtral.feed_forward import DenseMLP
from tests.test_parity import assert_matches_hf, random_prompts

DENSE_SHAPES = {
    "GQA 4/2 heads": {},
    "MHA 4/4 heads": dict(num_key_value_heads=4),
    "sliding window 8": dict(sliding_window=8),
    "tied embeddings": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_dense_greedy_matches_transformers_mistral(make_ckpt, shape: str) -> None:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(preset="mistral-tiny", **DENSE_SHAPES[shape])
    assert Checkpoint.open(checkpoint).args.model_type == "mistral"
    # Prompt + output (12 + 10) is longer than the sliding window (8): the rolling buffer wraps.
    assert_matches_hf(checkpoint, random_prompts([12, 5], 512, seed=1), [10, 7])


def test_dense_chunked_prefill_preemption_and_prefix_cache_match_transformers(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(preset="mistral-tiny", sliding_window=16)
    shared = random_prompts([20], 512, seed=4)[0]
    prompts = [shared + p for p in random_prompts([3, 9, 17], 512, seed=5)] + random_prompts([30, 1], 512, seed=6)
    # 8 tokens a step chunks the prompts; 12 blocks of 4 tokens cannot hold every sequence at once,
    # so some are preempted and recomputed; the shared 20 tokens are found in the prefix cache.
    options = EngineOptions(max_num_batched_tokens=8, max_num_seqs=4, block_size=4, kv_cache_memory_gb=12 * 4 * 2 * 2 * 2 * 16 * 4 / 2**30)
    engine = assert_matches_hf(checkpoint, prompts, [12, 6, 9, 4, 20], options)
    assert isinstance(engine.model.feed_forward, DenseMLP)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0, stats
