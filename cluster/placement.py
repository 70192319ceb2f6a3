"""Placement: one placement group per replica, a bundle for the coordinator and one per expert worker.

Who takes a GPU is the replica's layout: a worker of kind gpu takes one, one of kind cpu none, and
one of kind auto takes one where Ray offers one for each such worker. `bring_up` reserves the
group, starts the workers in it (cluster.expert_workers) and the engine host as a Ray actor in
bundle 0 (cluster.engine_host), for the CLI and the benchmark; a Serve replica does the same in
the group Serve reserved for it (cluster.serve.engine_deployment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.engine.build import EngineOptions
from cluster.engine_host import EngineHost
from cluster.errors import UserError
from cluster.expert_workers import ReplicaLayout, start_workers, wait_loaded
from cluster.placement_options import PlacementOptions, Strategy, fit_worker_cpus, placement_problem, together_problem
from mixtral.checkpoint import Checkpoint
from mixtral.config import ModelArgs
from router.expert_map import ExpertMap
from router.wire import new_secret
from workers.device import ACTOR_ENV
from workers.expert_worker import WorkerInfo

PLACEMENT_TIMEOUT_S = 120


@dataclass
class ExpertCluster:
    placement_group: PlacementGroup
    coordinator: Any  # ActorHandle[EngineHost]
    workers: list[Any]  # ActorHandle[ExpertWorker], indexed by worker
    worker_info: list[WorkerInfo]
    channel_secret: bytes  # what the coordinator proves to its workers on every connection
    layout: ReplicaLayout

    def shutdown(self) -> None:
        for actor in [self.coordinator, *self.workers]:
            ray.kill(actor)
        remove_placement_group(self.placement_group)


def expert_map_of(args: ModelArgs, placement: PlacementOptions, *, cluster_gpus: float) -> ExpertMap | None:
    """The replica's expert map; None for a dense model, which has no expert workers."""
    if not args.is_moe:
        if placement.expert_map is not None:
            raise UserError("the checkpoint is a dense model: it has no experts to place; drop the expert map")
        return None
    if placement.expert_map is None:
        return default_map(args.num_local_experts, placement, cluster_gpus=cluster_gpus)
    if placement.expert_map.num_experts != args.num_local_experts:
        raise UserError(
            f"the expert map is for {placement.expert_map.num_experts} experts; the checkpoint has {args.num_local_experts}"
        )
    return placement.expert_map


def default_map(num_experts: int, placement: PlacementOptions, *, cluster_gpus: float) -> ExpertMap:
    """Where no map is given: one expert per worker where each worker gets a GPU of its own (asked for,
    or the cluster has one for every expert); else every expert in one CPU worker, computing on all of
    its node's cores. A rule taken from benchmarks, not a measurement at start-up: on CPUs the
    workers share the node's cores and memory bandwidth, so more processes add wake-ups and hand-offs
    every layer and no bandwidth; one worker of every expert was the fastest map at batch 1 and at 64
    on the development machine (docs/performance.md, "Which expert map is fastest here")."""
    gpus = placement.use_gpus if placement.use_gpus is not None else cluster_gpus >= num_experts
    return ExpertMap.one_per_worker(num_experts) if gpus else ExpertMap.grouped(num_experts, num_experts, kind="cpu")


def replica_layout(args: ModelArgs, placement: PlacementOptions, *, cluster_gpus: float) -> ReplicaLayout:
    """Who takes a GPU: kinds gpu and cpu as the map says; kind auto as `use_gpus` says or, when
    that is None, a GPU each when the cluster has one for every worker that may take one. The
    coordinator takes one too when GPUs were asked for, or when one is left over for it."""
    expert_map = expert_map_of(args, placement, cluster_gpus=cluster_gpus)
    if expert_map is None:  # dense: one bundle, the coordinator's, on a GPU where asked for or where the cluster has one
        gpu = placement.use_gpus if placement.use_gpus is not None else cluster_gpus >= 1
        return ReplicaLayout(None, (), gpu)
    kinds = expert_map.kinds
    if placement.use_gpus is False and "gpu" in kinds:
        raise UserError("the expert map gives some workers kind gpu, but --accelerator cpu asks for none; change one")
    wanted = sum(k != "cpu" for k in kinds)
    auto = placement.use_gpus if placement.use_gpus is not None else wanted > 0 and cluster_gpus >= wanted
    gpus = tuple(k == "gpu" or (k == "auto" and auto) for k in kinds)
    if placement.use_gpus is not None:  # asked for: the coordinator takes one too, as the planner counts
        return ReplicaLayout(expert_map, gpus, placement.use_gpus)
    return ReplicaLayout(expert_map, gpus, any(gpus) and cluster_gpus > sum(gpus))


def bundles(layout: ReplicaLayout, options: PlacementOptions) -> list[dict[str, float]]:
    coordinator = {"CPU": options.coordinator_cpus} | ({"GPU": 1} if layout.coordinator_gpu else {})
    return [coordinator] + [{"CPU": options.worker_cpus} | ({"GPU": 1} if gpu else {}) for gpu in layout.worker_gpus]


def fitted(args: ModelArgs, placement: PlacementOptions) -> PlacementOptions:
    """The options with worker CPU shares sized from the cluster's CPUs (placement_options.fit_worker_cpus)."""
    resources = ray.cluster_resources()
    expert_map = expert_map_of(args, placement, cluster_gpus=resources.get("GPU", 0))
    if expert_map is None:
        return placement
    workers = expert_map.num_workers
    return fit_worker_cpus(placement, num_workers=workers, cluster_cpus=resources.get("CPU", 0.0))


def alive_nodes() -> list[dict[str, float]]:
    """Each live node's CPUs and GPUs."""
    return [{k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU")} for n in ray.nodes() if n["Alive"]]


def check_placeable_together(groups: list[tuple[str, list[dict[str, float]], Strategy]]) -> None:
    """Fail at once, saying which, when the cluster cannot hold all these placement groups together."""
    if problem := together_problem(groups, alive_nodes()):
        raise UserError(problem)


def check_placeable(replica_bundles: list[dict[str, float]], strategy: Strategy) -> None:
    """Fail at once, saying what is missing, when no node layout of this cluster can hold the bundles."""
    problem = placement_problem(replica_bundles, strategy, alive_nodes())
    if problem:
        raise UserError(problem)


def layout_here(args: ModelArgs, placement: PlacementOptions) -> ReplicaLayout:
    """The replica layout on the cluster Ray is connected to."""
    return replica_layout(args, placement, cluster_gpus=ray.cluster_resources().get("GPU", 0))


def bring_up(
    checkpoint: Checkpoint, *, engine: EngineOptions, placement: PlacementOptions, progress: bool = True
) -> ExpertCluster:
    """Reserve the placement group, start the workers and the engine host, wait for their weights."""
    args = checkpoint.args
    placement = fitted(args, placement)
    layout = layout_here(args, placement)
    replica = bundles(layout, placement)
    check_placeable(replica, placement.strategy)
    pg = placement_group(replica, strategy=placement.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:  # it fits the cluster, but other work holds the room
        remove_placement_group(pg)
        raise UserError(
            f"the placement group of 1 coordinator + {len(layout.worker_gpus)} workers waited {PLACEMENT_TIMEOUT_S} s for "
            f"room (free now: {ray.available_resources()}); stop other work on the cluster or add nodes"
        )
    secret = new_secret()
    workers = start_workers(checkpoint, pg, secret=secret, engine=engine, placement=placement, layout=layout)
    coordinator: Any = (
        ray.remote(EngineHost)
        .options(
            num_cpus=placement.coordinator_cpus,
            num_gpus=1 if layout.coordinator_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0),
            runtime_env={"env_vars": ACTOR_ENV},
        )
        .remote(checkpoint, workers, secret, engine, layout.expert_map, threads=placement.coordinator_threads)
    )
    loaded = wait_loaded([w.info.remote() for w in workers] + [coordinator.engine_steps.remote()], progress=progress)
    return ExpertCluster(pg, coordinator, workers, loaded[:-1], secret, layout)
