"""Placement that fits and fails fast: CPU shares sized from the cluster, and the fit check's answers."""

from __future__ import annotations

import pytest

from cluster.placement_options import PlacementOptions, can_place, fit_worker_cpus, placement_problem

COORDINATOR, WORKER, GPU_WORKER = {"CPU": 0.5}, {"CPU": 0.125}, {"CPU": 0.125, "GPU": 1.0}


def test_worker_shares_shrink_to_fit_a_small_machine_and_stay_default_on_a_big_one() -> None:
    small = fit_worker_cpus(PlacementOptions(), num_workers=16, cluster_cpus=2)
    assert 0.01 <= small.worker_cpus < 0.125 and small.coordinator_cpus + 16 * small.worker_cpus <= 2
    assert fit_worker_cpus(PlacementOptions(), num_workers=8, cluster_cpus=64).worker_cpus == 0.125
    assert fit_worker_cpus(PlacementOptions(), num_workers=1000, cluster_cpus=2).worker_cpus == 0.125  # hopeless: unchanged


@pytest.mark.parametrize(
    "bundles,strategy,nodes,fits",
    [
        ([COORDINATOR] + [WORKER] * 8, "PACK", [{"CPU": 2}], True),
        ([COORDINATOR] + [WORKER] * 16, "PACK", [{"CPU": 2}], False),
        ([COORDINATOR] + [WORKER] * 8, "STRICT_SPREAD", [{"CPU": 2}], False),
        ([COORDINATOR] + [GPU_WORKER] * 8, "STRICT_SPREAD", [{"CPU": 1}] + [{"CPU": 1, "GPU": 1}] * 8, True),
        ([COORDINATOR] + [GPU_WORKER] * 8, "PACK", [{"CPU": 1}] + [{"CPU": 1, "GPU": 1}] * 7, False),
        ([COORDINATOR] + [WORKER] * 8, "STRICT_PACK", [{"CPU": 1}, {"CPU": 1}], False),
        ([COORDINATOR] + [WORKER] * 4, "STRICT_PACK", [{"CPU": 1}, {"CPU": 1}], True),
        ([COORDINATOR] + [WORKER] * 12, "SPREAD", [{"CPU": 1}, {"CPU": 1}], True),
    ],
)
def test_can_place(bundles: list[dict[str, float]], strategy: str, nodes: list[dict[str, float]], fits: bool) -> None:
    assert can_place(bundles, strategy, nodes) is fits  # type: ignore[arg-type]


def test_a_placement_that_cannot_fit_says_what_is_missing_and_what_would_fit() -> None:
    problem = placement_problem([COORDINATOR] + [WORKER] * 8, "STRICT_SPREAD", [{"CPU": 4.0}])
    assert problem is not None
    assert "8 workers" in problem and "STRICT_SPREAD" in problem and "{'CPU': 4.0}" in problem
    assert "use --strategy PACK" in problem
    hopeless = placement_problem([COORDINATOR] + [GPU_WORKER] * 8, "PACK", [{"CPU": 4.0}])
    assert hopeless is not None and hopeless.endswith("add nodes")
    assert placement_problem([COORDINATOR] + [WORKER] * 8, "PACK", [{"CPU": 4.0}]) is None


def test_models_that_each_fit_alone_are_refused_when_they_cannot_fit_together() -> None:
    from cluster.placement_options import together_problem

    head, gpu_node = {"CPU": 4.0}, {"CPU": 4.0, "GPU": 1.0}
    nodes = [head] + [gpu_node] * 8
    mixtral = [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 8  # a coordinator and eight GPU workers
    mistral = [{"CPU": 1.0, "GPU": 1.0}]  # a dense replica: its coordinator on a GPU
    assert together_problem([("mixtral", mixtral, "PACK")], nodes) is None
    assert together_problem([("mistral", mistral, "PACK")], nodes) is None
    problem = together_problem([("mixtral", mixtral, "PACK"), ("mistral", mistral, "PACK")], nodes)
    assert problem is not None and "a replica of mistral" in problem and "after a replica of mixtral" in problem
    assert together_problem([("mixtral", mixtral, "PACK"), ("mistral", mistral, "PACK")], nodes + [gpu_node]) is None
    # STRICT_PACK takes one node's room for the whole group, so a second group needs another node.
    packed = [{"CPU": 2.0}, {"CPU": 1.0}]
    assert together_problem([("a", packed, "STRICT_PACK"), ("b", packed, "STRICT_PACK")], [{"CPU": 4.0}]) is not None
    assert together_problem([("a", packed, "STRICT_PACK"), ("b", packed, "STRICT_PACK")], [{"CPU": 4.0}] * 2) is None
