"""Where an engine step's time goes (mixtral.step_clock): the parts, each timed where it happens,
account for nearly all of a measured step, for an MoE model and a dense one."""

from __future__ import annotations

import functools

import pytest
import torch

from cluster.engine.build import EngineOptions, local_engine
from cluster.engine.sampling import SamplingParams
from mixtral.checkpoint import Checkpoint
from mixtral.step_clock import PARTS, StepClock, synchronizer
from tests.test_parity import random_prompts

MOE_PARTS = {"schedule", "prepare", "attention", "dispatch", "wait", "combine", "head", "sample", "finish"}


@pytest.mark.parametrize("preset", ["tiny", "mistral-tiny"])
def test_the_timed_parts_account_for_at_least_90_percent_of_a_step(make_ckpt, preset: str) -> None:  # type: ignore[no-untyped-def]
    engine = local_engine(Checkpoint.open(make_ckpt(preset=preset)))
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)] * 3
    engine.generate(random_prompts([12, 5, 9], 512, seed=1), params)
    report = engine.breakdown(reset=True)
    assert report["steps"] == engine.steps > 20
    assert report["accounted"] >= 0.9, report
    assert sum(report[p] for p in PARTS) <= report["step"]  # parts are within the step, never counted twice
    spent = {p for p in PARTS if report[p] > 0}
    assert spent == (MOE_PARTS if preset == "tiny" else MOE_PARTS - {"dispatch", "wait", "combine"} | {"mlp"})
    assert engine.breakdown()["steps"] == 0  # reset


def test_on_a_gpu_each_part_is_closed_by_a_device_synchronise(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    """CUDA kernels run after their launch returns: without a wait at each part's end they would be
    counted in whichever later part first waits for them. No GPU runs here: what is checked is that
    the clock waits at both ends of every part, that a GPU's waiting is torch.cuda.synchronize, and
    that the model runner's clock on a CPU does not wait at all."""
    events: list[str] = []
    clock = StepClock(lambda: events.append("sync"))
    for part in ("attention", "dispatch"):
        with clock.timing(part):
            events.append(part)
    assert events == ["sync", "attention", "sync", "sync", "dispatch", "sync"]
    waits = synchronizer(torch.device("cuda", 1))
    assert (
        isinstance(waits, functools.partial) and waits.func is torch.cuda.synchronize and waits.args == (torch.device("cuda", 1),)
    )
    assert synchronizer(torch.device("cpu")) is None
    checkpoint = Checkpoint.open(make_ckpt())
    assert local_engine(checkpoint).model.clock.synchronize is None  # serving: never
    assert local_engine(checkpoint, EngineOptions(synchronized_timing=True)).model.clock.synchronize is None  # a CPU
