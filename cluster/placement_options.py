"""How a replica's placement group is laid out, as data: importable without Ray (the CLI's --help, ServeArgs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@dataclass(frozen=True)
class PlacementOptions:
    strategy: Strategy = "PACK"
    coordinator_cpus: float = 0.5
    worker_cpus: float = 0.125  # 8 workers share one core on a CPU-only machine
    coordinator_threads: int | None = None  # None: every core of its node (workers.device.set_coordinator_threads)
    use_gpus: bool | None = None  # None: one GPU per worker when the cluster has enough GPUs
