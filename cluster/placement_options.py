"""How a replica's placement group is laid out, as data: importable without Ray (the CLI's --help, ServeArgs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

from cluster.errors import UserError
from router.expert_map import ExpertMap, ExpertMapError, with_hot_replicas

Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@dataclass(frozen=True)
class PlacementOptions:
    strategy: Strategy = "PACK"
    coordinator_cpus: float = 0.5
    worker_cpus: float = 0.125  # 8 workers share one core on a CPU-only machine
    coordinator_threads: int | None = None  # None: every core of its node (workers.device.set_coordinator_threads)
    use_gpus: bool | None = None  # None: one GPU per worker when the cluster has enough GPUs
    expert_map: ExpertMap | None = None  # which worker holds which experts; None: cluster.placement.default_map


def resolve_expert_map(
    num_experts: int,
    *,
    experts_per_worker: int | None = None,
    replicate_hot: int = 0,
    map_path: str | None = None,
    dense: str | None = None,
) -> ExpertMap | None:
    """The map the options ask for (None: the default, cluster.placement.default_map, or a dense model's
    none); UserError if it cannot serve. `dense`: the name of a dense model, for which any of these
    options is a mistake (it has no experts to place)."""
    if dense is not None:
        given = {"--experts-per-worker": experts_per_worker, "--replicate-hot": replicate_hot, "--expert-map": map_path}
        if wrong := [flag for flag, value in given.items() if value]:
            raise UserError(f"{dense} is a dense model (no experts to place): drop {', '.join(wrong)}")
        return None
    if map_path is not None and experts_per_worker is not None:
        raise UserError("--expert-map and --experts-per-worker both say where the experts go; give one of them")
    if map_path is not None and replicate_hot:
        raise UserError("--replicate-hot adds copies to a map it makes; with --expert-map, put the copies in the map itself")
    if experts_per_worker is not None and experts_per_worker < 1:
        raise UserError(f"--experts-per-worker must be at least 1, not {experts_per_worker}")
    if map_path is None and experts_per_worker is None and not replicate_hot:
        return None
    try:
        if map_path is not None and map_path.lstrip().startswith("{"):  # the map itself (a Serve config's args)
            base = ExpertMap.loads(map_path, num_experts=num_experts)
        elif map_path is not None:
            base = ExpertMap.read(map_path, num_experts=num_experts)
        else:
            base = ExpertMap.grouped(num_experts, min(experts_per_worker or 1, num_experts))
        return with_hot_replicas(base, replicate_hot)
    except ExpertMapError as e:
        raise UserError(str(e)) from None


MIN_WORKER_CPUS = 0.01  # below this a worker's share is not a share: the cluster is too small
Bundle = dict[str, float]


def fit_worker_cpus(options: PlacementOptions, *, num_workers: int, cluster_cpus: float) -> PlacementOptions:
    """Worker CPU shares sized from what the cluster has: the default share where it fits, a smaller
    one where not (16 workers and a coordinator on 2 CPUs), so any expert count runs on a small machine.
    Workers sleep in recv while others compute, so a share is a scheduling token, not a speed."""
    room = (cluster_cpus - options.coordinator_cpus) / num_workers
    share = math.floor(min(options.worker_cpus, room) * 1000) / 1000
    return replace(options, worker_cpus=share) if share >= MIN_WORKER_CPUS else options


def _fits(bundle: Bundle, room: Bundle) -> bool:
    return all(room.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def _take(room: Bundle, bundle: Bundle) -> None:
    for k, v in bundle.items():
        room[k] = room.get(k, 0.0) - v


def can_place(bundles: list[Bundle], strategy: Strategy, nodes: list[Bundle]) -> bool:
    """Whether the bundles fit on nodes with these resources, first fit by decreasing size (a
    placement it finds is a real one; on the shapes here it finds one whenever one exists)."""
    return place(bundles, strategy, [dict(n) for n in nodes])


def place(bundles: list[Bundle], strategy: Strategy, rooms: list[Bundle]) -> bool:
    """can_place, taking what the bundles use out of `rooms` when they fit (rooms are left part-taken
    when they do not)."""
    if strategy == "STRICT_PACK":
        total: Bundle = {}
        for bundle in bundles:
            for k, v in bundle.items():
                total[k] = total.get(k, 0.0) + v
        fitting = [room for room in rooms if _fits(total, room)]
        if fitting:
            _take(fitting[0], total)
        return bool(fitting)
    used: set[int] = set()
    for bundle in sorted(bundles, key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0)), reverse=True):
        candidates = [
            i for i, room in enumerate(rooms) if _fits(bundle, room) and not (strategy == "STRICT_SPREAD" and i in used)
        ]
        if not candidates:
            return False
        _take(rooms[candidates[0]], bundle)
        used.add(candidates[0])
    return True


def together_problem(groups: list[tuple[str, list[Bundle], Strategy]], nodes: list[Bundle]) -> str | None:
    """None if every placement group fits the nodes at once, one after another (each model's replicas:
    `(model, bundles, strategy)`); else which one no longer fits and what the others took."""
    rooms = [dict(n) for n in nodes]
    placed: list[str] = []
    for name, bundles, strategy in groups:
        if not place(bundles, strategy, rooms):
            before = f"after {', '.join(placed)}" if placed else "on its own"
            return (
                f"the cluster cannot hold every model's replicas at once: a replica of {name} ({len(bundles)} bundles, "
                f"{strategy}) does not fit {before}; lower min_replicas, give a model --accelerator cpu, or add nodes"
            )
        placed.append(f"a replica of {name}")
    return None


def placement_problem(bundles: list[Bundle], strategy: Strategy, nodes: list[Bundle]) -> str | None:
    """None if the bundles can be placed; else what is missing and what would fit, for the user."""
    if can_place(bundles, strategy, nodes):
        return None
    worker = bundles[-1]
    others: list[Strategy] = [s for s in get_args(Strategy) if s != strategy]
    would_fit = [s for s in others if can_place(bundles, s, nodes)]
    have = "; ".join(f"{n}" for n in nodes)
    fix = f"use --strategy {would_fit[0]}, which fits this cluster" if would_fit else "add nodes"
    return (
        f"the cluster cannot place 1 coordinator {bundles[0]} + {len(bundles) - 1} workers {worker} each with strategy "
        f"{strategy}; its nodes have {have}; {fix}"
    )
