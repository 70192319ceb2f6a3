"""Bring-up of a replica's expert workers: each started in its bundle of the replica's placement
group, waited for until its weights are loaded, and what they report summed up.

Bundle 0 holds the coordinator; bundle 1 + w holds expert worker w, with the experts the expert
map gives it. A worker of kind gpu takes a GPU, one of kind cpu none, and one of kind auto takes
a GPU where the layout says so (the device comes from Ray's assignment); otherwise workers take
fractional CPUs and the same code runs on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from cluster.engine.build import EngineOptions
from cluster.placement_options import PlacementOptions
from mixtral.checkpoint import Checkpoint
from router.expert_map import ExpertMap
from workers.device import ACTOR_ENV
from workers.expert_worker import ExpertWorker, WorkerInfo


@dataclass(frozen=True)
class ReplicaLayout:
    """What one replica asks of the cluster: its expert map (None: a dense model, no workers), and who takes a GPU."""

    expert_map: ExpertMap | None
    worker_gpus: tuple[bool, ...]  # per worker
    coordinator_gpu: bool


@dataclass(frozen=True)
class WorkerSummary:
    """How a replica's experts compute, over all its workers (workers.expert_worker.WorkerInfo)."""

    compute_dtype: str  # the dtypes their GEMMs run in, "/"-joined
    half_rows: int  # calls of up to this many rows an expert computes in the checkpoint's half precision
    packed_workers: int  # workers holding their matrices packed for oneDNN's GEMM (workers.device.onednn_packs)
    num_workers: int

    @classmethod
    def of(cls, infos: Sequence[WorkerInfo]) -> WorkerSummary:
        return cls(
            compute_dtype="/".join(sorted({i.compute_dtype for i in infos})),
            half_rows=max(i.half_rows for i in infos),
            packed_workers=sum(i.packed for i in infos),
            num_workers=len(infos),
        )

    def stats(self) -> dict[str, Any]:
        return {
            "expert_compute_dtype": self.compute_dtype,
            "expert_half_rows": self.half_rows,
            "expert_packed_workers": self.packed_workers,
        }


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
    """Expert worker w, holding the map's experts of worker w, in bundle 1 + w of `pg` (placed by now);
    none for a dense model."""
    if layout.expert_map is None:
        return []
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
