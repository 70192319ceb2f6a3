"""Rebalancing from live load: with a router that sends one expert about three
times its share, a new map from the measured load evens the workers, live, while 8 streams run
through the switch, and no token changes."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.build import EngineOptions, local_engine
from cluster.engine.rebalance import Rebalancer, local_calls, ray_calls
from cluster.engine.sampling import SamplingParams
from cluster.errors import UserError
from mixtral.checkpoint import Checkpoint
from router.load import balancedness
from tests.biased_gate import biased_checkpoint
from tests.test_parity import random_prompts
from workers.telemetry import Telemetry

STREAMS, TOKENS = 8, 40


@pytest.fixture(scope="module")
def biased(make_ckpt, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    return biased_checkpoint(make_ckpt(), tmp_path_factory.mktemp("biased") / "model")


def run_streams(engine: AsyncEngine, prompts: list[list[int]], tag: str) -> list[list[int]]:
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)

    async def one(i: int) -> list[int]:
        return [e.token_id async for e in engine.stream(prompts[i], params, f"{tag}-{i}")]

    async def all_of_them() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))

    return asyncio.run(all_of_them())


def test_rebalancing_evens_the_workers_live_while_8_streams_run_and_changes_no_token(biased: Path) -> None:
    engine = local_engine(Checkpoint.open(biased), EngineOptions(max_num_seqs=STREAMS))  # one expert per worker
    coordinator = engine.model.feed_forward  # the MoE block: its transport, map and loads
    workers = coordinator.transport.workers  # type: ignore[attr-defined]  # LocalTransport's ExpertWorkers
    holdings: list[list[list[int]]] = []  # what a supervisor would be told a restarted worker must hold
    rebalancer = Rebalancer(
        coordinator,
        load_experts=local_calls(workers, "load_experts"),
        hold_only=local_calls(workers, "hold_only"),
        set_holdings=lambda h: holdings.append([list(w) for w in h]),
        telemetry=Telemetry(""),
    )
    served = AsyncEngine(engine)
    prompts = random_prompts([16] * STREAMS, 512, seed=21)
    with pytest.raises(UserError, match="send traffic first"):
        rebalancer.rebalance(max_experts_per_worker=2, copies=16)

    reference = run_streams(served, prompts, "a")  # on one expert per worker
    per_expert, rows = rebalancer.window()
    assert 2.5 / 8 < per_expert[0] / sum(per_expert) < 3.5 / 8  # the biased router: about 3x expert 0's share
    before = balancedness(rows)
    assert before < 0.4

    switched: dict[str, object] = {}

    def rebalance_mid_stream() -> None:
        start, deadline = engine.steps, time.monotonic() + 120
        while engine.steps < start + 10:  # well into the streams: prefill done, decoding
            if time.monotonic() > deadline:
                return  # the streams never got going: the assertions below fail, not a hung session
            time.sleep(0.005)
        switched["steps"] = engine.steps
        switched["result"] = rebalancer.rebalance(max_experts_per_worker=2, copies=16)
        switched["done_at"] = engine.steps

    thread = threading.Thread(target=rebalance_mid_stream, daemon=True)
    thread.start()
    through_the_switch = run_streams(served, prompts, "b")
    thread.join(timeout=120)
    result = switched["result"]
    steps_after = engine.steps
    assert through_the_switch == reference  # no request lost or changed
    assert switched["done_at"] < steps_after  # the streams ran on after the switch: it happened mid-stream
    assert result.before == pytest.approx(before, abs=0.05)  # type: ignore[attr-defined]
    new_map = result.expert_map  # type: ignore[attr-defined]
    assert len(new_map.copies[0]) >= 3 and all(len(h) <= 2 for h in new_map.workers)
    assert [sorted(w.experts) for w in workers] == [list(h) for h in new_map.workers]  # dropped what they lost
    assert holdings == [[list(h) for h in new_map.workers]]  # a worker restarted from now on gets the new map's

    assert run_streams(served, prompts, "c") == reference  # a whole run on the new map
    after = balancedness(coordinator.worker_load.window())
    assert after > 0.7, f"balancedness {before:.2f} -> {after:.2f}"
    # The workers' own counts agree with what the coordinator sent them.
    assert sum(sum(w.stats.tokens.values()) for w in workers) == sum(coordinator.worker_load.snapshot())
    served.shutdown()


class StuckWorker:
    """An expert worker actor whose loading never ends (a disk that stopped answering)."""

    def load_experts(self, experts: list[int]) -> list[int]:
        time.sleep(3600)
        return experts


def test_a_worker_that_never_finishes_loading_fails_the_rebalance_in_bounded_time(ray_session) -> None:  # type: ignore[no-untyped-def]
    import ray

    stuck = ray.remote(StuckWorker).options(num_cpus=0).remote()
    call = ray_calls([stuck], "load_experts", timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"workers \[0\] did not finish load_experts within 1 s"):
        call({0: [3]})
    assert time.monotonic() - start < 60  # bounded by the timeout, not by the stuck worker
    ray.kill(stuck)
