"""The distributed path on a real local Ray: coordinator actor + expert worker actors.

The workers hold experts by a map with several experts on some workers and copies of some experts
on several (tests/test_serve.py runs one per worker, with hot copies; the CLI's tests the CPU
default, every expert in one worker)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from cluster.engine.build import EngineOptions
from cluster.engine.sampling import SamplingParams
from cluster.model_runner import non_expert_weights
from cluster.placement import ExpertCluster, bring_up
from cluster.placement_options import PlacementOptions
from mixtral import names
from mixtral.checkpoint import INDEX_FILE, Checkpoint
from mixtral.config import load_args
from router.expert_map import ExpertMap
from tests.reference import hf_greedy, hf_model
from tests.test_parity import random_prompts


@pytest.fixture(scope="module")
def checkpoint(make_ckpt) -> Path:  # type: ignore[no-untyped-def]
    return make_ckpt(sliding_window=12)


MAP = ExpertMap(8, ((0, 1), (2,), (3, 4), (5, 6, 7), (0,), (1, 7)), ("auto",) * 6)


@pytest.fixture(scope="module")
def cluster(ray_session, checkpoint: Path) -> Iterator[ExpertCluster]:  # type: ignore[no-untyped-def]
    handle = bring_up(
        Checkpoint.open(checkpoint),
        engine=EngineOptions(max_num_batched_tokens=16, overlap_min_tokens=2),
        placement=PlacementOptions(expert_map=MAP),
        progress=False,
    )
    yield handle
    handle.shutdown()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def test_ray_actors_match_transformers(cluster: ExpertCluster, checkpoint: Path) -> None:
    prompts = random_prompts([5, 21, 2, 13], 512, seed=7)
    max_tokens = [9, 4, 14, 6]
    results = ray.get(cluster.coordinator.generate.remote(prompts, [greedy(n) for n in max_tokens]))
    model = hf_model(checkpoint)
    for result, prompt, n in zip(results, prompts, max_tokens):
        ref_ids, ref_logprobs = hf_greedy(model, prompt, n)
        assert result.token_ids == ref_ids
        torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)


def test_bench_mixed_workload_against_static_batches(cluster: ExpertCluster, checkpoint: Path, tmp_path: Path) -> None:
    from cluster.bench.machine import measure_machine
    from cluster.bench.mixed import mixed_requests
    from cluster.bench.run import BenchSpec, mixed_on, summary

    spec = BenchSpec(
        checkpoint=Checkpoint.open(checkpoint),
        dtype="float32",
        concurrency=[],
        prompt_len=64,
        output_len=32,
        baseline=True,
        out=tmp_path,
        workload="mixed",
        requests=6,
        hf_batch_size=4,
    )
    report = mixed_on(cluster.coordinator, spec, measure_machine(("float32",)))
    [row] = report["results"]
    drawn = mixed_requests(6, max_prompt=64, max_output=32, vocab_size=512, seed=0)
    assert len({len(r.prompt) for r in drawn}) > 1 and len({r.output_len for r in drawn}) > 1
    assert all(4 <= len(r.prompt) <= 64 and 2 <= r.output_len <= 32 for r in drawn)
    # Both sides made exactly the drawn tokens; the ratio is of their rates.
    assert row["requests"] == 6 and row["output_tokens"] == sum(r.output_len for r in drawn)
    assert row["ratio"] == pytest.approx(row["tok_s"] / row["baseline_tok_s"])
    # Static batches of 4 and 2: a request's reply is complete when its whole batch is.
    assert sorted(row["baseline_done_s"].count(t) for t in set(row["baseline_done_s"])) == [2, 4]
    assert max(row["done_s"]) == pytest.approx(row["wall_s"])
    assert "static batches of 4" in summary(report) and "ratio" in summary(report)
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "bench.json").read_text())["results"] == [row]


def test_each_actor_reads_only_its_own_tensors(cluster: ExpertCluster, checkpoint: Path) -> None:
    args = load_args(checkpoint)
    weight_map = json.loads((checkpoint / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 3, "the test checkpoint must be sharded for this to mean anything"
    for experts, worker in zip(MAP.workers, cluster.workers, strict=True):
        log = ray.get(worker.read_log.remote())
        own = [n for e in experts for n in names.expert_weights(args.num_hidden_layers, e)]
        assert sorted(log.tensors_read) == sorted(own)
        assert set(log.shards_opened) == {weight_map[n] for n in own}
    log = ray.get(cluster.coordinator.read_log.remote())
    assert not [n for n in log.tensors_read if names.is_expert_weight(n)]
    assert sorted(log.tensors_read) == sorted(non_expert_weights(args))
    assert sorted(log.shards_opened) == sorted({weight_map[n] for n in non_expert_weights(args)})


def test_workers_are_placed_one_per_bundle_on_cpu(cluster: ExpertCluster) -> None:
    assert [(w.worker, w.experts) for w in cluster.worker_info] == [(w, list(e)) for w, e in enumerate(MAP.workers)]
    assert all(w.device == "cpu" and w.gpu_ids == [] and w.threads == 1 for w in cluster.worker_info)
    assert all(w.huge_pages for w in cluster.worker_info)
    assert len({w.pid for w in cluster.worker_info}) == 6


def test_a_lost_worker_loses_no_request(cluster: ExpertCluster) -> None:
    prompt = random_prompts([6], 512, seed=11)
    [before] = ray.get(cluster.coordinator.generate.remote(prompt, [greedy(8)]))
    ray.kill(cluster.workers[3], no_restart=False)  # Ray restarts it; it reloads its experts (5, 6, 7)
    [after] = ray.get(cluster.coordinator.generate.remote(prompt, [greedy(8)]))
    assert after.token_ids == before.token_ids
    assert ray.get(cluster.workers[3].info.remote()).pid != cluster.worker_info[3].pid


def test_all_workers_killed_ten_times_mid_stream_lose_no_token(cluster: ExpertCluster) -> None:
    prompts = random_prompts([5, 9, 3, 12, 7, 4, 8, 6], 512, seed=31)
    params = [greedy(150)] * 8
    reference = ray.get(cluster.coordinator.generate.remote(prompts, params))
    steps = ray.get(cluster.coordinator.engine_steps.remote())
    running = cluster.coordinator.generate.remote(prompts, params)  # 8 concurrent greedy streams
    while ray.get(cluster.coordinator.engine_steps.remote()) < steps + 3:
        time.sleep(0.02)
    for _ in range(10):  # SIGKILL every worker, ten times, a second apart: restarts overlap the kills
        for worker in cluster.workers:
            ray.kill(worker, no_restart=False)
        time.sleep(1.0)
    results = ray.get(running, timeout=600)
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]
    assert [r.finish_reason for r in results] == ["length"] * 8
    assert ray.get(cluster.coordinator.engine_steps.remote()) > steps + 150  # it ran through, step by step
    infos = ray.get([w.info.remote() for w in cluster.workers], timeout=120)  # every worker is back and answers
    assert not {i.pid for i in infos} & {i.pid for i in cluster.worker_info}
