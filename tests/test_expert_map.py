"""Expert maps: several experts per worker, copies of an expert on several
workers, worker kinds; the tokens stay transformers' whatever the map, and each worker reads only
the tensors of the experts it holds."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cluster.engine.build import EngineOptions
from cluster.engine.rebalance import rebalanced
from cluster.errors import UserError
from cluster.placement import ReplicaLayout, bundles, replica_layout
from cluster.placement_options import PlacementOptions, resolve_expert_map
from mixtral import names
from mixtral.checkpoint import INDEX_FILE, Checkpoint
from mixtral.config import load_args
from router.expert_map import ExpertMap, ExpertMapError, balanced_map, with_hot_replicas, worker_loads
from router.load import balancedness
from router.moe import moe_layer, pieces
from router.routing import route
from router.transport import LocalTransport
from router.wire import Segment, new_secret
from tests.reference import reference_moe
from tests.test_parity import assert_matches_hf, random_prompts
from tests.test_routing import D, ToyExpert, random_experts
from workers.expert_worker import ExpertWorker


def random_map(num_experts: int, seed: int) -> ExpertMap:
    """Between 1 and E + 2 workers, each expert on 1 to 3 of them, several experts on some."""
    rng = random.Random(seed)
    num_workers = rng.randint(1, num_experts + 2)
    held: list[set[int]] = [set() for _ in range(num_workers)]
    for e in range(num_experts):
        for w in rng.sample(range(num_workers), rng.randint(1, min(3, num_workers))):
            held[w].add(e)
    for h in held:  # no empty worker: give it a copy of some expert
        if not h:
            h.add(rng.randrange(num_experts))
    return ExpertMap(num_experts, tuple(tuple(sorted(h)) for h in held), ("auto",) * num_workers)


class ToyWorker:
    """Several ToyExperts behind one forward(layer, x, segments), as ExpertWorker has them."""

    def __init__(self, experts: dict[int, ToyExpert]) -> None:
        self.experts = experts
        self.calls = 0

    def forward(self, layer: int, x: torch.Tensor, segments=()) -> torch.Tensor:  # type: ignore[no-untyped-def]
        self.calls += 1
        out, row = [], 0
        for e, n in segments:
            out.append(self.experts[e].forward(layer, x[row : row + n]))
            row += n
        return torch.cat(out)


@pytest.mark.parametrize("seed", range(6))
def test_any_map_gives_the_reference_moe_layer_with_one_call_per_busy_worker(seed: int) -> None:
    num_experts, top_k = [(8, 2), (4, 1), (6, 3)][seed % 3]
    expert_map = random_map(num_experts, seed)
    gate, w1, w2, w3 = random_experts(num_experts, seed=seed)
    experts = [ToyExpert(e, *w) for e, w in enumerate(zip(w1, w2, w3))]
    workers = [ToyWorker({e: experts[e] for e in held}) for held in expert_map.workers]
    x = torch.randn(37, D, generator=torch.Generator().manual_seed(seed))
    plan = route(F.linear(x, gate), top_k)
    out = moe_layer(1, x, plan, LocalTransport(workers), expert_map)
    torch.testing.assert_close(out, reference_moe(x, gate, w1, w2, w3, top_k), rtol=1e-5, atol=1e-5)
    assert all(w.calls <= 1 for w in workers)


def test_an_experts_tokens_are_split_evenly_over_its_copies() -> None:
    expert_map = ExpertMap(4, ((0, 1), (0, 2), (0, 3), (1,)), ("auto",) * 4)
    plan = route(torch.tensor([[9.0, 0, 0, 0]] * 10 + [[0, 9.0, 0, 0]] * 3), 1)  # expert 0: 10 tokens, 1: 3
    cuts = pieces(plan, expert_map, layer=0)
    assert sorted((p.expert, p.stop - p.start) for p in cuts) == [(0, 3), (0, 3), (0, 4), (1, 1), (1, 2)]
    assert all(p.worker in expert_map.copies[p.expert] for p in cuts)
    covered = sorted(i for p in cuts for i in range(p.start, p.stop))
    assert covered == list(range(13))  # every routed pair once
    # The copy that takes the larger share turns with the layer.
    firsts = {next(p.worker for p in pieces(plan, expert_map, layer) if p.expert == 0) for layer in range(3)}
    assert firsts == {0, 1, 2}


@pytest.mark.parametrize(
    "map_name,expert_map",
    [
        ("4 per worker", ExpertMap.grouped(8, 4)),
        ("3 per worker, last holds 2", ExpertMap.grouped(8, 3)),
        ("replicas of 0 and 5", ExpertMap(8, ((0, 1), (2, 3), (4, 5), (6, 7), (0, 5), (0,)), ("auto",) * 6)),
        ("random", random_map(8, seed=11)),
    ],
)
def test_the_engine_over_a_map_matches_transformers(make_ckpt, map_name: str, expert_map: ExpertMap) -> None:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(sliding_window=16)
    prompts = random_prompts([3, 17, 9], 512, seed=5)
    assert_matches_hf(checkpoint, prompts, [8, 5, 11], EngineOptions(max_num_batched_tokens=16), expert_map=expert_map)


def test_workers_on_two_threads_hold_matrices_packed_for_onednn_and_match_transformers(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    """Float32 workers of several threads compute on matrices packed for oneDNN's GEMM (workers.device.onednn_packs)."""
    checkpoint = make_ckpt(sliding_window=16)
    worker = ExpertWorker(Checkpoint.open(checkpoint), [0, 5], channel_secret=new_secret(), threads=2)
    assert worker.info().packed and not ExpertWorker(Checkpoint.open(checkpoint), 0, channel_secret=new_secret()).info().packed
    assert all(m.is_mkldnn for layers in worker.experts.values() for expert in layers for m in expert[:3])
    prompts = random_prompts([3, 17, 9], 512, seed=5)
    options = EngineOptions(max_num_batched_tokens=16)
    assert_matches_hf(checkpoint, prompts, [8, 5, 11], options, expert_map=ExpertMap.grouped(8, 4), worker_threads=2)


def test_a_worker_reads_only_the_tensors_of_the_experts_it_holds(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    path = make_ckpt()
    checkpoint = Checkpoint.open(path)
    layers = checkpoint.args.num_hidden_layers
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    worker = ExpertWorker(checkpoint, [2, 5], worker=0, channel_secret=new_secret())
    own = names.expert_weights(layers, 2) + names.expert_weights(layers, 5)
    assert sorted(worker.read_log().tensors_read) == sorted(own)
    assert set(worker.read_log().shards_opened) == {weight_map[n] for n in own}
    assert worker.info().experts == [2, 5]
    # A new map: it loads expert 7's tensors, and only those, and lets 2 go.
    assert worker.hold_only([5, 7]) == [5, 7]
    assert sorted(worker.read_log().tensors_read) == sorted(own + names.expert_weights(layers, 7))


def test_map_files_say_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    good = ExpertMap(4, ((0, 1), (2, 3), (0,)), ("gpu", "gpu", "cpu"))
    good.write(tmp_path / "map.json")
    assert ExpertMap.read(tmp_path / "map.json", num_experts=4) == good
    bad = {
        "no expert 3": ({"workers": [{"experts": [0, 1, 2]}]}, "no worker holds expert 3"),
        "no such expert": ({"workers": [{"experts": [0, 1, 2, 3, 4]}]}, "holds expert 4, but the model's experts are 0..3"),
        "twice": ({"workers": [{"experts": [0, 0, 1, 2, 3]}]}, "holds an expert twice"),
        "empty": ({"workers": [{"experts": [0, 1, 2, 3]}, {"experts": []}]}, "worker 1 holds no expert"),
        "kind": ({"workers": [{"experts": [0, 1, 2, 3], "kind": "tpu"}]}, "kind 'tpu'"),
        "experts count": ({"num_experts": 8, "workers": [{"experts": [0]}]}, "the map is for 8 experts, the checkpoint has 4"),
        "not a list": ({"workers": [{"experts": "0,1"}]}, "a list of expert numbers"),
        "shape": ([1, 2], "an expert map is"),
    }
    for name, (data, message) in bad.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        with pytest.raises(ExpertMapError, match=message):
            ExpertMap.read(tmp_path / f"{name}.json", num_experts=4)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="is not JSON"):
        resolve_expert_map(4, map_path=str(tmp_path / "broken.json"))
    with pytest.raises(UserError, match="cannot read the expert map"):
        resolve_expert_map(4, map_path=str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="give one of them"):
        resolve_expert_map(4, map_path=str(tmp_path / "map.json"), experts_per_worker=2)
    with pytest.raises(UserError, match="put the copies in the map itself"):
        resolve_expert_map(4, map_path=str(tmp_path / "map.json"), replicate_hot=2)
    with pytest.raises(UserError, match="--experts-per-worker must be at least 1, not 0"):
        resolve_expert_map(4, experts_per_worker=0)
    assert resolve_expert_map(4, map_path=good.dumps()) == good  # the map itself, as a Serve config carries it


def test_options_make_the_maps_they_name() -> None:
    assert resolve_expert_map(8) is None  # the default: one expert per worker
    assert resolve_expert_map(8, experts_per_worker=4) == ExpertMap.grouped(8, 4)
    assert resolve_expert_map(8, experts_per_worker=20) == ExpertMap.grouped(8, 8)  # one worker holds every expert
    hot = resolve_expert_map(8, replicate_hot=4)
    assert hot is not None and hot.num_workers == 8 and sum(map(len, hot.workers)) == 12
    assert all(len(h) <= 2 for h in hot.workers)
    with pytest.raises(UserError, match="ask for at most 56 copies"):
        resolve_expert_map(8, replicate_hot=60)


def test_hot_copies_go_where_the_load_is_and_even_the_workers() -> None:
    load = [3 / 8] + [5 / 56] * 7  # expert 0 takes three times its share
    one_each = ExpertMap.one_per_worker(8)
    assert balancedness(worker_loads(one_each, load)) == pytest.approx(1 / 3)  # type: ignore[arg-type]
    rebalanced = with_hot_replicas(one_each, 8, load)
    assert len(rebalanced.copies[0]) >= 4 and all(len(h) <= 2 for h in rebalanced.workers)
    assert balancedness(worker_loads(rebalanced, load)) > 0.9  # type: ignore[arg-type]
    even = balanced_map([1.0] * 8, kinds=("auto",) * 4, slots_per_worker=3, copies=12)
    assert sorted(len(c) for c in even.copies) == [1] * 4 + [2] * 4  # no load to chase: the copies spread evenly
    assert sorted(len(h) for h in even.workers) == [3] * 4


def test_bundles_follow_the_map_and_its_kinds(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    args = load_args(make_ckpt())
    mixed = ExpertMap(8, ((0, 1), (2, 3), (4, 5), (6, 7), (0, 7)), ("gpu", "gpu", "auto", "auto", "cpu"))
    options = PlacementOptions(expert_map=mixed, worker_cpus=0.25, coordinator_cpus=1)
    layout = replica_layout(args, options, cluster_gpus=4)
    assert layout == ReplicaLayout(mixed, (True, True, True, True, False), coordinator_gpu=False)
    assert bundles(layout, options) == [{"CPU": 1}] + [{"CPU": 0.25, "GPU": 1}] * 4 + [{"CPU": 0.25}]
    no_gpus = replica_layout(args, options, cluster_gpus=0)
    assert no_gpus.worker_gpus == (True, True, False, False, False)  # kind gpu asks for one wherever it runs
    with pytest.raises(UserError, match="the expert map is for 8 experts; the checkpoint has 4"):
        replica_layout(dataclasses.replace(args, num_local_experts=4), options, cluster_gpus=4)
    with pytest.raises(UserError, match="--accelerator cpu asks for none"):
        replica_layout(args, dataclasses.replace(options, use_gpus=False), cluster_gpus=4)


def test_a_rebalance_keeps_each_workers_slots_and_leaves_cpu_workers_alone() -> None:
    planned = ExpertMap(8, ((0, 1), (2, 3), (4, 5), (0, 2), (6, 7)), ("gpu", "gpu", "gpu", "gpu", "cpu"))
    load = [1.0, 9.0, 1.0, 1.0, 1.0, 8.0, 50.0, 1.0]  # 1 and 5 hot on the GPUs; 6 hot, but on the CPU worker
    new = rebalanced(planned, load)
    assert new.workers[4] == (6, 7) and new.kinds == planned.kinds  # the CPU worker keeps its experts
    assert [len(h) for h in new.workers] == [2, 2, 2, 2, 2]  # each GPU holds as many as it was sized for
    assert {e for h in new.workers[:4] for e in h} == set(range(6))  # every GPU expert still on a GPU
    assert len(new.copies[1]) == 2 and len(new.copies[5]) == 2  # the spare slots went to the hot ones
    gpu = [worker_loads(new, load)[w] for w in range(4)]
    assert balancedness(gpu) > balancedness([worker_loads(planned, load)[w] for w in range(4)])


def test_worker_stats_are_a_copy_taken_between_calls_not_the_counters_the_compute_thread_writes(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    # Ray pickles worker_stats' answer on its own thread while the compute thread goes on counting:
    # a live dict could change size mid-pickle.
    checkpoint = Checkpoint.open(make_ckpt())
    worker = ExpertWorker(checkpoint, [0, 3], channel_secret=new_secret())
    x = torch.randn(5, checkpoint.args.hidden_size)
    worker.forward(0, x, [Segment(0, 2), Segment(3, 3)])
    first = worker.worker_stats()
    worker.forward(1, x, [Segment(3, 5)])
    assert (first.calls, first.tokens) == (1, {0: 2, 3: 3})
    now = worker.worker_stats()
    assert (now.calls, now.tokens, now.experts) == (2, {0: 2, 3: 8}, [0, 3])


def test_the_default_map_is_one_worker_of_every_expert_on_cpus_and_one_expert_a_gpu_where_each_has_one(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    args = load_args(make_ckpt())
    every = ExpertMap(8, (tuple(range(8)),), ("cpu",))
    cpu_only = replica_layout(args, PlacementOptions(), cluster_gpus=0)
    assert cpu_only == ReplicaLayout(every, (False,), coordinator_gpu=False)
    assert bundles(cpu_only, PlacementOptions()) == [{"CPU": 0.5}, {"CPU": 0.125}]
    assert replica_layout(args, PlacementOptions(), cluster_gpus=4).expert_map == every  # too few GPUs for one each
    assert replica_layout(args, PlacementOptions(use_gpus=False), cluster_gpus=8).expert_map == every
    for gpus, options in ((8, PlacementOptions()), (9, PlacementOptions()), (0, PlacementOptions(use_gpus=True))):
        layout = replica_layout(args, options, cluster_gpus=gpus)
        assert layout.expert_map == ExpertMap.one_per_worker(8) and layout.worker_gpus == (True,) * 8
