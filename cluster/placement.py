"""Bring-up: one placement group, a bundle for the coordinator and one per expert worker.

Bundle 0 holds the coordinator; bundle 1 + w holds expert worker w, with the experts the expert
map gives it. A worker of kind gpu takes a GPU, one of kind cpu none, and one of kind auto takes
a GPU where Ray offers one for each such worker (the device comes from Ray's assignment);
otherwise workers take fractional CPUs and the same code runs on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from cluster.coordinator_actor import CoordinatorActor
from cluster.engine.build import EngineOptions
from cluster.errors import UserError
from cluster.placement_options import PlacementOptions, Strategy, fit_worker_cpus, placement_problem
from mixtral.checkpoint import Checkpoint
from mixtral.config import MixtralArgs
from router.expert_map import ExpertMap
from router.wire import new_secret
from workers.device import ACTOR_ENV
from workers.expert_worker import ExpertWorker, WorkerInfo

PLACEMENT_TIMEOUT_S = 120


@dataclass
class ExpertCluster:
    placement_group: PlacementGroup
    coordinator: Any  # ActorHandle[CoordinatorActor]
    workers: list[Any]  # ActorHandle[ExpertWorker], indexed by worker
    worker_info: list[WorkerInfo]
    channel_secret: bytes  # what the coordinator proves to its workers on every connection
    layout: ReplicaLayout

    def shutdown(self) -> None:
        for actor in [self.coordinator, *self.workers]:
            ray.kill(actor)
        remove_placement_group(self.placement_group)


@dataclass(frozen=True)
class ReplicaLayout:
    """What one replica asks of the cluster: its expert map, and who takes a GPU."""

    expert_map: ExpertMap
    worker_gpus: tuple[bool, ...]  # per worker
    coordinator_gpu: bool


def expert_map_of(args: MixtralArgs, placement: PlacementOptions) -> ExpertMap:
    if placement.expert_map is None:
        return ExpertMap.one_per_worker(args.num_local_experts)
    if placement.expert_map.num_experts != args.num_local_experts:
        raise UserError(
            f"the expert map is for {placement.expert_map.num_experts} experts; the checkpoint has {args.num_local_experts}"
        )
    return placement.expert_map


def replica_layout(args: MixtralArgs, placement: PlacementOptions, *, cluster_gpus: float) -> ReplicaLayout:
    """Who takes a GPU: kinds gpu and cpu as the map says; kind auto as `use_gpus` says or, when
    that is None, a GPU each when the cluster has one for every worker that may take one. The
    coordinator takes one too when GPUs were asked for, or when one is left over for it."""
    expert_map = expert_map_of(args, placement)
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


def fitted(args: MixtralArgs, placement: PlacementOptions) -> PlacementOptions:
    """The options with worker CPU shares sized from the cluster's CPUs (placement_options.fit_worker_cpus)."""
    cpus = ray.cluster_resources().get("CPU", 0.0)
    workers = expert_map_of(args, placement).num_workers
    return fit_worker_cpus(placement, num_workers=workers, cluster_cpus=cpus)


def check_placeable(replica_bundles: list[dict[str, float]], strategy: Strategy) -> None:
    """Fail at once, saying what is missing, when no node layout of this cluster can hold the bundles."""
    nodes = [{k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU")} for n in ray.nodes() if n["Alive"]]
    problem = placement_problem(replica_bundles, strategy, nodes)
    if problem:
        raise UserError(problem)


def layout_here(args: MixtralArgs, placement: PlacementOptions) -> ReplicaLayout:
    """The replica layout on the cluster Ray is connected to."""
    return replica_layout(args, placement, cluster_gpus=ray.cluster_resources().get("GPU", 0))


def worker_threads(pg: PlacementGroup) -> list[int]:
    """Per worker: its node's cores over the workers placed there, at least one. Workers take turns
    with the coordinator within a layer, and with each other only where they share a node: one
    worker holding every expert computes on every core, as transformers does; eight on two cores
    take one each."""
    nodes = ray.util.placement_group_table(pg)["bundles_to_node_id"]  # bundle -> node, once placed
    cpus = {n["NodeID"]: n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["Alive"]}
    workers = [nodes[b] for b in sorted(nodes) if b > 0]
    return [max(1, int(cpus.get(node, 1.0) // workers.count(node))) for node in workers]


def start_workers(
    checkpoint: Checkpoint,
    pg: PlacementGroup,
    *,
    secret: bytes,
    engine: EngineOptions,
    placement: PlacementOptions,
    layout: ReplicaLayout,
) -> list[Any]:
    """Expert worker w, holding the map's experts of worker w, in bundle 1 + w of `pg` (placed by now)."""
    worker_cls = ray.remote(ExpertWorker)
    threads = worker_threads(pg)
    return [
        worker_cls.options(
            num_cpus=placement.worker_cpus,
            num_gpus=1 if gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=1 + w),
            # Workers hold only weights: a restarted one reloads its experts and the call is sent
            # again. Without limit: a replica must outlive any number of worker deaths.
            max_restarts=-1,
            max_task_retries=-1,
            # Pings and new channels are answered while it reads the experts a rebalance gives it.
            max_concurrency=4,
            runtime_env={"env_vars": ACTOR_ENV},
        ).remote(
            checkpoint,
            experts,
            worker=w,
            channel_secret=secret,
            dtype=engine.dtype,
            threads=threads[w],
            expert_dtype=engine.expert_dtype,
        )
        for w, (experts, gpu) in enumerate(zip(layout.expert_map.workers, layout.worker_gpus))
    ]


def wait_loaded(refs: list[Any], *, progress: bool) -> list[Any]:
    """Wait for the actors' first calls (their weights are loaded by then), with a progress bar."""
    pending = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    with tqdm(total=len(refs), desc="loading weights", unit="actor", disable=not progress) as bar:
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done)] = ray.get(done)  # raises for an actor that failed to load
            bar.update(1)
    return results


def bring_up(
    checkpoint: Checkpoint, *, engine: EngineOptions, placement: PlacementOptions, progress: bool = True
) -> ExpertCluster:
    """Reserve the placement group, start the workers and the coordinator, wait for their weights."""
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
            f"the placement group of 1 coordinator + {layout.expert_map.num_workers} workers waited {PLACEMENT_TIMEOUT_S} s for "
            f"room (free now: {ray.available_resources()}); stop other work on the cluster or add nodes"
        )
    secret = new_secret()
    workers = start_workers(checkpoint, pg, secret=secret, engine=engine, placement=placement, layout=layout)
    coordinator: Any = (
        ray.remote(CoordinatorActor)
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
