"""A small machine: the session's Ray has 2 CPUs, as CI's machine has 2 cores."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from cluster.engine.build import EngineOptions
from cluster.errors import UserError
from cluster.placement import bring_up
from cluster.placement_options import PlacementOptions
from mixtral.checkpoint import Checkpoint
from tests.reference import hf_greedy, hf_model
from tests.test_cluster import greedy
from tests.test_parity import random_prompts


def test_sixteen_experts_top_4_generate_on_two_cpus_and_an_impossible_layout_fails_fast(ray_session, make_ckpt) -> None:  # type: ignore[no-untyped-def]
    assert ray.cluster_resources()["CPU"] == 2  # the session's Ray is a 2-core machine
    checkpoint = Checkpoint.open(make_ckpt(num_local_experts=16, num_experts_per_tok=4))
    start = time.monotonic()
    with pytest.raises(UserError, match="16 workers.*STRICT_SPREAD.*use --strategy PACK"):
        bring_up(checkpoint, engine=EngineOptions(), placement=PlacementOptions(strategy="STRICT_SPREAD"), progress=False)
    assert time.monotonic() - start < 5  # refused at once; it used to wait 120 s
    sixteen = bring_up(checkpoint, engine=EngineOptions(), placement=PlacementOptions(), progress=False)
    try:
        prompt = random_prompts([7], 512, seed=16)[0]
        [result] = ray.get(sixteen.coordinator.generate.remote([prompt], [greedy(6)]))
    finally:
        sixteen.shutdown()
    assert len(sixteen.workers) == 16
    ref_ids, ref_logprobs = hf_greedy(hf_model(checkpoint.path), prompt, 6)
    assert result.token_ids == ref_ids
    torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)
