"""The parts of autoscaling that need no cluster: the views over replicas, the policy, the settings, traces."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.serve.app import api_key
from cluster.serve.args import ServeArgs
from cluster.serve.autoscaling import EngineLoadPolicy
from cluster.serve.fleet import fleet_load, fleet_metrics, fleet_stats
from cluster.serve.replica_registry import ReplicaRegistry, ReplicaSnapshot
from cluster.serve.stats_view import engine_summary
from router.load import ExpertLoad
from router.trace import TraceWriter, read_trace, replica_trace_path
from workers.telemetry import Telemetry, local_families

LAYERS, EXPERTS, TOP_K = 3, 4, 2


def random_records(load: ExpertLoad, seed: int, steps: int) -> list[tuple[int, list[int], float, float]]:
    rng = random.Random(seed)
    records = []
    for _ in range(steps):
        for layer in range(LAYERS):
            counts = [rng.randrange(0, 5) * TOP_K for _ in range(EXPERTS)]
            records.append((layer, counts, rng.random(), rng.random() / 100))
    for layer, counts, entropy, seconds in records:
        load.record(layer, counts, entropy_sum=entropy, dispatch_seconds=seconds)
    return records


def stats(running: int, steps: int, blocks_free: int, *, hits: int = 0) -> dict[str, float]:
    return {
        "running": running,
        "waiting": 1,
        "steps": steps,
        "preemptions": 2,
        "kv_blocks": 100,
        "kv_blocks_free": blocks_free,
        "kv_cache_usage": 1 - blocks_free / 100,
        "prefix_cache_queried_tokens": 50,
        "prefix_cache_hit_tokens": hits,
        "prefix_cache_hit_rate": hits / 50,
        "kv_cache_bytes": 1000,
        "resident_bytes": 10,
    }


def snapshot(name: str, load: ExpertLoad, replica_stats: dict[str, float], *, serving: bool = True) -> ReplicaSnapshot:
    workers = [
        {"worker": e, "experts": [e], "tokens": 3, "calls": e + 1, "forward_ms": 2.0, "bytes_in": 10, "bytes_out": 20}
        for e in range(EXPERTS)
    ]
    return ReplicaSnapshot(name, serving, load.counters(), workers, replica_stats, local_families())


def test_the_load_over_replicas_is_the_load_of_all_their_tokens() -> None:
    a, b, both = (ExpertLoad(LAYERS, EXPERTS, TOP_K) for _ in range(3))
    for layer, counts, entropy, seconds in random_records(a, 1, 7) + random_records(b, 2, 5):
        both.record(layer, counts, entropy_sum=entropy, dispatch_seconds=seconds)
    report = fleet_load([snapshot("a", a, stats(1, 7, 90)), snapshot("b", b, stats(0, 5, 100), serving=False)])
    expected = both.report()
    assert report["tokens"] == expected["tokens"]
    for key in ("share", "balancedness", "router_entropy", "dispatch_ms"):
        torch.testing.assert_close(torch.tensor(report[key]), torch.tensor(expected[key]))
    assert [r["tokens"] for r in report["replicas"]] == [a.snapshot(), b.snapshot()]
    assert [r["serving"] for r in report["replicas"]] == [True, False]
    assert [w["calls"] for w in report["workers"]] == [2 * (e + 1) for e in range(EXPERTS)]
    assert [w["tokens"] for w in report["workers"]] == [6] * EXPERTS


def test_stats_sum_counters_over_every_replica_and_gauges_over_serving_ones() -> None:
    load = ExpertLoad(LAYERS, EXPERTS, TOP_K)
    out = fleet_stats(
        [
            snapshot("a", load, stats(3, 10, 80, hits=10) | {"expert_half_rows": 1, "expert_packed_workers": 1}),
            snapshot("b", load, stats(2, 20, 60, hits=20) | {"expert_half_rows": 4, "expert_packed_workers": 0}),
            snapshot("c", load, stats(9, 30, 0, hits=5) | {"expert_packed_workers": 2}, serving=False),  # stopped
        ]
    )
    assert (out["expert_half_rows"], out["expert_packed_workers"]) == (4, 1)  # what the serving replicas chose
    assert (out["steps"], out["preemptions"], out["prefix_cache_hit_tokens"]) == (60, 6, 35)
    assert (out["running"], out["waiting"], out["kv_blocks"], out["kv_blocks_free"]) == (5, 2, 200, 140)
    assert out["kv_cache_usage"] == pytest.approx(0.3)
    assert out["prefix_cache_hit_rate"] == pytest.approx(35 / 150)
    assert out["num_replicas"] == 2 and [r["replica"] for r in out["replicas"]] == ["a", "b", "c"]
    summary = engine_summary(out)
    assert "replicas: 2 serving of 3" in summary and "c stopped: 9 running" in summary


def test_metrics_render_every_serving_replicas_series_with_its_label() -> None:
    Telemetry("m").inc("moe_generation_tokens", 7)
    Telemetry("m").set("moe_kv_cache_usage_perc", 0.5)
    load = ExpertLoad(LAYERS, EXPERTS, TOP_K)
    text = fleet_metrics([snapshot(r, load, stats(0, 0, 100), serving=r != "gone") for r in ("r1", "r2", "gone")]).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}  # a valid exposition
    tokens = [s for s in families["moe_generation_tokens"].samples if s.labels["model"] == "m"]
    assert sorted(s.labels["replica"] for s in tokens) == ["r1", "r2"]
    assert all(s.value >= 7 for s in tokens)
    assert {s.labels["replica"] for s in families["moe_kv_cache_usage_perc"].samples} == {"r1", "r2"}


def test_the_registry_keeps_a_stopped_replicas_snapshot_and_ages_out_a_silent_one(monkeypatch: pytest.MonkeyPatch) -> None:
    registry, load = ReplicaRegistry(), ExpertLoad(LAYERS, EXPERTS, TOP_K)
    registry.publish(snapshot("a", load, stats(1, 1, 99)))
    registry.publish(snapshot("b", load, stats(1, 1, 99), serving=False))
    assert [(s.replica, s.serving) for s in registry.all()] == [("a", True), ("b", False)]
    import cluster.serve.replica_registry as module

    now = module.time.time()
    monkeypatch.setattr(module.time, "time", lambda: now + module.STALE_S + 1)
    assert [(s.replica, s.serving) for s in registry.all()] == [("a", False), ("b", False)]


def context(
    metrics: dict[str, list[float]], replicas: int, *, target: int | None = None, scaled_up_s_ago: float | None = None
) -> AutoscalingContext:
    deployment = DeploymentID(name="EngineServer", app_name="moe")
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=deployment) for i in range(replicas)]
    now = 1000.0
    return AutoscalingContext(
        deployment_id=deployment,
        deployment_name="EngineServer",
        app_name="moe",
        current_num_replicas=replicas,
        target_num_replicas=target or replicas,
        running_replicas=ids,
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics={k: {ids[i]: v for i, v in enumerate(values)} for k, values in metrics.items()},  # type: ignore[attr-defined]
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4,
        policy_state={},
        last_scale_up_time=None if scaled_up_s_ago is None else now - scaled_up_s_ago,
        last_scale_down_time=None,
        current_time=now,
        config=AutoscalingConfig(min_replicas=1, max_replicas=4),
    )


@pytest.mark.parametrize(
    "metrics, replicas, desired",
    [
        # running + waiting over capacity: one replica full with 8 more waiting is 3 replicas' load
        ({"running": [4], "waiting": [8], "max_num_seqs": [4], "kv_cache_usage": [0.2]}, 1, 3 / 0.75),
        # the KV cache full with few sequences (long contexts) counts as full
        ({"running": [1, 1], "waiting": [0, 0], "max_num_seqs": [64, 64], "kv_cache_usage": [0.9, 0.3]}, 2, 1.2 / 0.75),
        # idle replicas: fewer wanted (Serve keeps min_replicas)
        ({"running": [0, 0], "waiting": [0, 0], "max_num_seqs": [4, 4], "kv_cache_usage": [0.0, 0.0]}, 2, 0.0),
        # nothing recorded yet (replicas starting): hold
        ({}, 2, 2),
    ],
)
def test_the_policy_asks_for_the_replicas_the_engine_load_needs(metrics: dict, replicas: int, desired: float) -> None:
    wanted, _ = EngineLoadPolicy(target_load=0.75)(context(metrics, replicas))
    assert wanted == pytest.approx(desired)


def test_a_dip_in_load_never_cancels_a_replica_that_is_still_starting() -> None:
    low = {"running": [1], "waiting": [0], "max_num_seqs": [4], "kv_cache_usage": [0.1]}
    policy = EngineLoadPolicy(target_load=0.75, startup_s=300)
    assert policy(context(low, 1, target=2, scaled_up_s_ago=20))[0] == 2  # the second replica is starting
    assert policy(context(low, 1, target=2, scaled_up_s_ago=400))[0] == pytest.approx(0.25 / 0.75)  # stuck: let go
    assert policy(context(low, 2, target=2, scaled_up_s_ago=20))[0] == pytest.approx(0.25 / 0.75)  # up: load decides


def test_replica_settings_are_checked_and_the_key_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="max_replicas \\(1\\) is below min_replicas \\(2\\)"):
        ServeArgs(min_replicas=2, max_replicas=1)
    with pytest.raises(ValidationError, match="not both"):
        ServeArgs(api_key="abcdefgh", api_key_env="KEY")
    assert not ServeArgs(min_replicas=2).autoscaling and ServeArgs(max_replicas=2).autoscaling
    monkeypatch.delenv("MOE_TEST_KEY", raising=False)
    with pytest.raises(Exception, match="set MOE_TEST_KEY to the API key"):
        api_key(ServeArgs(api_key_env="MOE_TEST_KEY"))
    monkeypatch.setenv("MOE_TEST_KEY", "sesame-sesame")
    assert api_key(ServeArgs(api_key_env="MOE_TEST_KEY")) == "sesame-sesame"


def test_per_replica_traces_are_read_back_together(tmp_path: Path) -> None:
    base = tmp_path / "routes.msgpack"
    g = torch.Generator().manual_seed(0)
    ids = {r: torch.randint(0, EXPERTS, (5 + r, TOP_K), generator=g) for r in range(2)}
    for r, chosen in ids.items():
        writer = TraceWriter(replica_trace_path(base, f"replica{r}"), layers=1, experts=EXPERTS, top_k=TOP_K)
        writer.record(0, chosen)
        writer.end_step()
        writer.close()
    trace = read_trace(base)
    assert trace.counts == [torch.bincount(torch.cat(list(ids.values())).flatten(), minlength=EXPERTS).tolist()]
    assert trace.steps == 2
    with pytest.raises(FileNotFoundError, match="per-replica"):
        read_trace(tmp_path / "missing.msgpack")


def test_the_registry_folds_replicas_gone_an_hour_into_one_total_that_keeps_their_counters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cluster.serve.replica_registry as module

    loads = [ExpertLoad(LAYERS, EXPERTS, TOP_K) for _ in range(3)]
    for seed, load in enumerate(loads):
        random_records(load, seed, 4)
    registry = ReplicaRegistry()
    now = module.time.time()
    for name, load, serving in zip(("a", "b", "c"), loads, (False, False, True)):
        registry.publish(snapshot(name, load, stats(1, 10, 90, hits=3), serving=serving))
    before = fleet_stats(registry.all()), fleet_load(registry.all())
    monkeypatch.setattr(module.time, "time", lambda: now + module.FORGET_S + 1)
    registry.publish(snapshot("c", loads[2], stats(1, 10, 90, hits=3)))  # c goes on serving
    after = registry.all()
    assert [s.replica for s in after] == ["c", module.RETIRED] and len(registry.snapshots) == 1
    stats_after, load_after = fleet_stats(after), fleet_load(after)
    for key in ("steps", "preemptions", "prefix_cache_hit_tokens", "prefix_cache_queried_tokens"):
        assert stats_after[key] == before[0][key]  # the gone replicas' counters stay in the totals
    assert load_after["tokens"] == before[1]["tokens"]
    assert [w["calls"] for w in load_after["workers"]] == [w["calls"] for w in before[1]["workers"]]
    assert "and 2 gone for over an hour: 20 steps" in engine_summary(stats_after)
