"""Bring-up: one placement group, a bundle for the coordinator and one per expert worker.

Bundle 0 holds the coordinator; bundle 1 + e holds expert worker e. Where Ray offers a GPU per
expert, each worker bundle takes one (and the device comes from Ray's assignment); otherwise
workers take fractional CPUs and the same code runs on CPU.
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
from router.wire import new_secret
from workers.device import HUGE_PAGES_ENV
from workers.expert_worker import ExpertWorker, WorkerInfo

PLACEMENT_TIMEOUT_S = 120


@dataclass
class ExpertCluster:
    placement_group: PlacementGroup
    coordinator: Any  # ActorHandle[CoordinatorActor]
    workers: list[Any]  # ActorHandle[ExpertWorker], indexed by expert
    worker_info: list[WorkerInfo]
    channel_secret: bytes  # what the coordinator proves to its workers on every connection

    def shutdown(self) -> None:
        for actor in [self.coordinator, *self.workers]:
            ray.kill(actor)
        remove_placement_group(self.placement_group)


def bundles(args: MixtralArgs, options: PlacementOptions, *, gpus: bool, coordinator_gpu: bool) -> list[dict[str, float]]:
    coordinator = {"CPU": options.coordinator_cpus} | ({"GPU": 1} if coordinator_gpu else {})
    worker = {"CPU": options.worker_cpus} | ({"GPU": 1} if gpus else {})
    return [coordinator] + [dict(worker) for _ in range(args.num_local_experts)]


def fitted(args: MixtralArgs, placement: PlacementOptions) -> PlacementOptions:
    """The options with worker CPU shares sized from the cluster's CPUs (placement_options.fit_worker_cpus)."""
    cpus = ray.cluster_resources().get("CPU", 0.0)
    return fit_worker_cpus(placement, num_workers=args.num_local_experts, cluster_cpus=cpus)


def check_placeable(replica_bundles: list[dict[str, float]], strategy: Strategy) -> None:
    """Fail at once, saying what is missing, when no node layout of this cluster can hold the bundles."""
    nodes = [{k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU")} for n in ray.nodes() if n["Alive"]]
    problem = placement_problem(replica_bundles, strategy, nodes)
    if problem:
        raise UserError(problem)


def wants_gpus(args: MixtralArgs, placement: PlacementOptions) -> tuple[bool, bool]:
    """(a GPU per worker, a GPU for the coordinator too) from the option or what the cluster has."""
    if placement.use_gpus is not None:  # asked for: the coordinator takes one too, as the planner counts
        return placement.use_gpus, placement.use_gpus
    available = ray.cluster_resources().get("GPU", 0)
    gpus = available >= args.num_local_experts
    return gpus, gpus and available > args.num_local_experts


def start_workers(
    checkpoint: Checkpoint, pg: PlacementGroup, *, secret: bytes, dtype: str | None, placement: PlacementOptions, gpus: bool
) -> list[Any]:
    """Expert worker e in bundle 1 + e of `pg`."""
    worker_cls = ray.remote(ExpertWorker)
    return [
        worker_cls.options(
            num_cpus=placement.worker_cpus,
            num_gpus=1 if gpus else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=1 + e),
            # Workers hold only weights: a restarted one reloads its expert and the call is sent
            # again. Without limit: a replica must outlive any number of worker deaths.
            max_restarts=-1,
            max_task_retries=-1,
            runtime_env={"env_vars": HUGE_PAGES_ENV},
        ).remote(checkpoint, e, channel_secret=secret, dtype=dtype, cpu_share=placement.worker_cpus)
        for e in range(checkpoint.args.num_local_experts)
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
    gpus, coordinator_gpu = wants_gpus(args, placement)
    replica = bundles(args, placement, gpus=gpus, coordinator_gpu=coordinator_gpu)
    check_placeable(replica, placement.strategy)
    pg = placement_group(replica, strategy=placement.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:  # it fits the cluster, but other work holds the room
        remove_placement_group(pg)
        raise UserError(
            f"the placement group of 1 coordinator + {args.num_local_experts} workers waited {PLACEMENT_TIMEOUT_S} s for "
            f"room (free now: {ray.available_resources()}); stop other work on the cluster or add nodes"
        )
    secret = new_secret()
    workers = start_workers(checkpoint, pg, secret=secret, dtype=engine.dtype, placement=placement, gpus=gpus)
    coordinator: Any = (
        ray.remote(CoordinatorActor)
        .options(
            num_cpus=placement.coordinator_cpus,
            num_gpus=1 if coordinator_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0),
            runtime_env={"env_vars": HUGE_PAGES_ENV},
        )
        .remote(checkpoint, workers, secret, engine, threads=placement.coordinator_threads)
    )
    loaded = wait_loaded([w.info.remote() for w in workers] + [coordinator.engine_steps.remote()], progress=progress)
    return ExpertCluster(pg, coordinator, workers, loaded[:-1], secret)
