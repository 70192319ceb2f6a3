"""The expert map: which worker holds which experts, in how many copies, on which kind of device.

    workers[w] = the experts worker w holds        (one call per worker and layer carries all of them)
    copies[e]  = the workers holding expert e      (an expert's tokens are split evenly between them)
    kinds[w]   = gpu | cpu | auto                  (auto: a GPU where the cluster has one per such worker)

Where none is given: one expert per worker (worker e holding expert e) where each worker gets a GPU,
else every expert in one CPU worker (cluster.placement.default_map). A map is read from and written to
JSON (`plan --emit` writes one, `--expert-map FILE` reads one):

    {"num_experts": 8, "workers": [{"experts": [0, 1], "kind": "gpu"}, ...]}
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

WorkerKind = Literal["auto", "gpu", "cpu"]


class ExpertMapError(ValueError):
    """A map that cannot serve: an expert nobody holds, one that does not exist, an empty worker."""


@dataclass(frozen=True)
class ExpertMap:
    num_experts: int
    workers: tuple[tuple[int, ...], ...]
    kinds: tuple[WorkerKind, ...]

    def __post_init__(self) -> None:
        if problem := self._problem():
            raise ExpertMapError(problem)

    def _problem(self) -> str | None:
        if len(self.kinds) != len(self.workers):
            return f"{len(self.workers)} workers but {len(self.kinds)} kinds"
        for w, (experts, kind) in enumerate(zip(self.workers, self.kinds)):
            if not experts:
                return f"worker {w} holds no expert; give it at least one or leave it out"
            if bad := [e for e in experts if not 0 <= e < self.num_experts]:
                return f"worker {w} holds expert {bad[0]}, but the model's experts are 0..{self.num_experts - 1}"
            if len(set(experts)) != len(experts):
                return f"worker {w} holds an expert twice ({list(experts)}); a copy goes on another worker"
            if kind not in get_args(WorkerKind):
                return f"worker {w} has kind {kind!r}; use one of {', '.join(get_args(WorkerKind))}"
        held = {e for experts in self.workers for e in experts}
        if missing := sorted(set(range(self.num_experts)) - held):
            return f"no worker holds expert {missing[0]}: every expert needs at least one copy"
        return None

    @functools.cached_property
    def copies(self) -> tuple[tuple[int, ...], ...]:
        """Per expert, the workers holding it, in worker order (read on every MoE layer call: made once)."""
        return tuple(tuple(w for w, experts in enumerate(self.workers) if e in experts) for e in range(self.num_experts))

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @classmethod
    def one_per_worker(cls, num_experts: int) -> ExpertMap:
        return cls.grouped(num_experts, 1)

    @classmethod
    def grouped(cls, num_experts: int, experts_per_worker: int, kind: WorkerKind = "auto") -> ExpertMap:
        """Experts 0..n-1 on worker 0, n..2n-1 on worker 1, ... (the last worker may hold fewer)."""
        if experts_per_worker < 1:
            raise ExpertMapError(f"experts per worker must be at least 1, not {experts_per_worker}")
        workers = [
            tuple(range(start, min(start + experts_per_worker, num_experts)))
            for start in range(0, num_experts, experts_per_worker)
        ]
        return cls(num_experts, tuple(workers), (kind,) * len(workers))

    def to_json(self) -> dict[str, Any]:
        return {
            "num_experts": self.num_experts,
            "workers": [{"experts": list(experts), "kind": kind} for experts, kind in zip(self.workers, self.kinds)],
        }

    @classmethod
    def from_json(cls, data: Any, *, num_experts: int) -> ExpertMap:
        """A map for a model of `num_experts` experts; ExpertMapError, saying what is wrong, otherwise."""
        if not isinstance(data, dict) or not isinstance(data.get("workers"), list):
            raise ExpertMapError('an expert map is {"num_experts": E, "workers": [{"experts": [...], "kind": "gpu"}, ...]}')
        if data.get("num_experts", num_experts) != num_experts:
            raise ExpertMapError(f"the map is for {data['num_experts']} experts, the checkpoint has {num_experts}")
        workers, kinds = [], []
        for w, entry in enumerate(data["workers"]):
            experts = entry.get("experts") if isinstance(entry, dict) else None
            if not isinstance(experts, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in experts):
                raise ExpertMapError(f'worker {w} of the map needs "experts": a list of expert numbers')
            workers.append(tuple(experts))
            kinds.append(entry.get("kind", "auto"))
        return cls(num_experts, tuple(workers), tuple(kinds))

    @classmethod
    def read(cls, path: str | Path, *, num_experts: int) -> ExpertMap:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ExpertMapError(f"cannot read the expert map {path}: {e.strerror}") from None
        return cls.loads(text, num_experts=num_experts, source=f"the expert map {path}")

    @classmethod
    def loads(cls, text: str, *, num_experts: int, source: str = "the expert map") -> ExpertMap:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExpertMapError(f"{source} is not JSON: {e}") from None
        return cls.from_json(data, num_experts=num_experts)

    def dumps(self) -> str:
        """One line of JSON: what a Serve config's expert_map takes in place of a file's path."""
        return json.dumps(self.to_json(), separators=(",", ":"))

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    def describe(self) -> str:
        return "; ".join(f"worker {w} ({k}): {list(e)}" for w, (e, k) in enumerate(zip(self.workers, self.kinds)))


def worker_loads(expert_map: ExpertMap, expert_load: Sequence[float]) -> list[float]:
    """The load each worker gets when every expert's load is split evenly between its copies."""
    loads = [0.0] * expert_map.num_workers
    for e, holders in enumerate(expert_map.copies):
        for w in holders:
            loads[w] += expert_load[e] / len(holders)
    return loads


def balanced_map(
    expert_load: Sequence[float],
    *,
    kinds: Sequence[WorkerKind],
    slots_per_worker: int | Sequence[int],
    copies: int | None = None,
) -> ExpertMap:
    """A map over these workers, worker w holding at most its slots' worth of experts (one number for
    all, or one per worker), that evens their load, with `copies` expert copies in all (None: every
    slot filled).

    As EPLB does: first decide the copies (each spare slot goes to the expert whose copies carry the
    most load each), then place the copies, heaviest first, on the least loaded worker that has a
    free slot and no copy of that expert yet. Loads are any measure of tokens per expert.
    """
    num_experts, num_workers = len(expert_load), len(kinds)
    room = [slots_per_worker] * num_workers if isinstance(slots_per_worker, int) else list(slots_per_worker)
    slots = sum(room)
    if slots < num_experts:
        raise ExpertMapError(f"{num_workers} workers with {slots} slots in all cannot hold {num_experts} experts")
    load = [max(float(x), 0.0) for x in expert_load]
    if not any(load):
        load = [1.0] * num_experts
    num_copies = [1] * num_experts
    total = min(slots if copies is None else copies, slots, num_experts * num_workers)
    for _ in range(total - num_experts):
        hottest = max((e for e in range(num_experts) if num_copies[e] < num_workers), key=lambda e: load[e] / num_copies[e])
        num_copies[hottest] += 1
    pieces = sorted(
        ((load[e] / num_copies[e], e) for e in range(num_experts) for _ in range(num_copies[e])), key=lambda p: (-p[0], p[1])
    )
    held: list[list[int]] = [[] for _ in range(num_workers)]
    loads = [0.0] * num_workers
    for piece, e in pieces:
        free = [w for w in range(num_workers) if len(held[w]) < room[w] and e not in held[w]]
        w = min(free, key=lambda w: (loads[w], len(held[w]), w))
        held[w].append(e)
        loads[w] += piece
    return ExpertMap(num_experts, tuple(tuple(sorted(h)) for h in held), tuple(kinds))


def with_hot_replicas(expert_map: ExpertMap, replicas: int, expert_load: Sequence[float] | None = None) -> ExpertMap:
    """The map's workers with `replicas` spare slots in all, filled with copies of the hottest experts
    (by `expert_load`, or evenly when no load has been measured yet; rebalancing moves them later)."""
    if replicas < 0:
        raise ExpertMapError(f"--replicate-hot must be 0 or more, not {replicas}")
    if replicas == 0:
        return expert_map
    slots = math.ceil((expert_map.num_experts + replicas) / expert_map.num_workers)
    if slots > expert_map.num_experts:
        raise ExpertMapError(
            f"{replicas} hot copies over {expert_map.num_workers} workers would put more than the model's "
            f"{expert_map.num_experts} experts on one worker; ask for at most "
            f"{expert_map.num_workers * expert_map.num_experts - expert_map.num_experts} copies"
        )
    load = list(expert_load) if expert_load is not None else [1.0] * expert_map.num_experts
    return balanced_map(load, kinds=expert_map.kinds, slots_per_worker=slots, copies=expert_map.num_experts + replicas)
