"""A small machine: the session's Ray has 2 CPUs, as CI's machine has 2 cores."""

from __future__ import annotations

from dataclasses import replace

import pytest
import ray
import torch
from ray.util import placement_group_table

from cluster.engine.build import EngineOptions
from cluster.errors import UserError
from cluster.placement import bring_up
from cluster.placement_options import PlacementOptions
from mixtral.checkpoint import Checkpoint
from router.expert_map import ExpertMap
from tests.reference import hf_greedy, hf_model
from tests.test_cluster import greedy
from tests.test_parity import random_prompts


def test_sixteen_experts_top_4_generate_on_two_cpus_and_an_impossible_layout_is_refused_up_front(ray_session, make_ckpt) -> None:  # type: ignore[no-untyped-def]
    assert ray.cluster_resources()["CPU"] == 2  # the session's Ray is a 2-core machine
    checkpoint = Checkpoint.open(make_ckpt(num_local_experts=16, num_experts_per_tok=4))
    # One worker per expert (not the CPU default of one for all): sixteen processes on two CPUs.
    one_each = PlacementOptions(expert_map=ExpertMap.one_per_worker(16))
    groups = set(placement_group_table())  # every placement group made so far, removed ones too
    with pytest.raises(UserError, match="16 workers.*STRICT_SPREAD.*use --strategy PACK"):
        bring_up(checkpoint, engine=EngineOptions(), placement=replace(one_each, strategy="STRICT_SPREAD"), progress=False)
    # Refused from the cluster's nodes alone: no placement group was made, so none was waited on.
    assert set(placement_group_table()) == groups
    sixteen = bring_up(checkpoint, engine=EngineOptions(), placement=one_each, progress=False)
    assert len(set(placement_group_table()) - groups) == 1  # the table does show the group bring_up makes
    try:
        prompt = random_prompts([7], 512, seed=16)[0]
        [result] = ray.get(sixteen.coordinator.generate.remote([prompt], [greedy(6)]))
    finally:
        sixteen.shutdown()
    assert len(sixteen.workers) == 16
    ref_ids, ref_logprobs = hf_greedy(hf_model(checkpoint.path), prompt, 6)
    assert result.token_ids == ref_ids
    torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)
