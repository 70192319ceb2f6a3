"""Dense Mistral through the same engine: transformers' MistralForCausalLM (float32, eager) is the reference.

Greedy ids identical and logprobs within 1e-4 over GQA and MHA, a sliding window shorter than
prompt + output, chunked prefill, preemption and prefix caching; no expert workers anywhere.
"""

from __future__ import annotations

import json

import pytest
import torch

from cluster.engine.build import EngineOptions
from cluster.model_runner import non_expert_weights
from mixtral import names
from mixtral.checkpoint import INDEX_FILE, Checkpoint
from mixtral.feed_forward import DenseMLP
from tests.reference import hf_greedy, hf_model
from tests.test_cli import assert_one_line_error, run_cli, run_cli_here
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
    options = EngineOptions(
        max_num_batched_tokens=8, max_num_seqs=4, block_size=4, kv_cache_memory_gb=12 * 4 * 2 * 2 * 2 * 16 * 4 / 2**30
    )
    engine = assert_matches_hf(checkpoint, prompts, [12, 6, 9, 4, 20], options)
    assert isinstance(engine.model.feed_forward, DenseMLP)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0, stats


def test_generate_cli_runs_a_dense_checkpoint_as_one_actor_with_transformers_tokens(make_ckpt, cli_env, ray_address) -> None:  # type: ignore[no-untyped-def]
    # GQA 4/2 heads and a window of 8 under prompt + output of 20 (tests/test_models.py serves MHA through Serve).
    checkpoint = make_ckpt(preset="mistral-tiny", **DENSE_SHAPES["sliding window 8"])
    prompt = random_prompts([11], 512, seed=7)[0]
    proc = run_cli(
        "generate", str(checkpoint), "--prompt-ids", ",".join(map(str, prompt)), "--max-tokens", "9", "--ignore-eos",
        "--temperature", "0", "--json", env=cli_env | {"RAY_ADDRESS": ray_address},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ids, logprobs = hf_greedy(hf_model(checkpoint), prompt, 9)
    assert result["token_ids"] == ids
    torch.testing.assert_close(torch.tensor(result["logprobs"]), torch.tensor(logprobs), rtol=0, atol=1e-4)
    assert result["workers"] == [] and result["expert_load"] is None  # no expert worker was started


def test_make_checkpoint_writes_a_dense_mistral_preset(tmp_path, cli_env) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "mistral"
    proc = run_cli_here("make-checkpoint", str(out), "--preset", "mistral-tiny", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert config["sliding_window"] == 512 and (out / "tokenizer.model").is_file()
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1 and not any(names.is_expert_weight(n) for n in weight_map)
    assert set(weight_map) == set(non_expert_weights(Checkpoint.open(out).args))  # all of it is the coordinator's


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--experts-per-worker", "2"], "drop --experts-per-worker"),
        (["--replicate-hot", "1"], "drop --replicate-hot"),
        (["--expert-dtype", "int8"], "drop --expert-dtype"),
    ],
)
def test_expert_options_for_a_dense_model_are_one_clear_line(make_ckpt, cli_env, flags: list[str], fragment: str) -> None:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(preset="mistral-tiny")
    proc = run_cli_here("generate", str(checkpoint), "--prompt-ids", "1,2", *flags, env=cli_env)
    assert_one_line_error(proc, "is a dense model", fragment)


def test_bench_on_a_dense_model_says_what_it_measures_in_one_line(make_ckpt, cli_env) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli_here("bench", str(make_ckpt(preset="mistral-tiny")), env=cli_env)
    assert_one_line_error(proc, "is a dense model: bench measures the expert-parallel engine")
