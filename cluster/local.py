"""The same engine with every expert in this process: for tests, and as the one-process baseline."""

from __future__ import annotations

from pathlib import Path

from cluster.coordinator_actor import EngineOptions, engine_over, make_coordinator
from cluster.engine import Engine
from mixtral.config import load_args
from router.transport import LocalTransport
from workers.expert_worker import ExpertWorker


def local_engine(checkpoint: str | Path, options: EngineOptions = EngineOptions()) -> Engine:
    experts = [ExpertWorker(checkpoint, e, dtype=options.dtype) for e in range(load_args(checkpoint).num_local_experts)]
    coordinator = make_coordinator(checkpoint, LocalTransport(experts), options)
    return engine_over(coordinator, options)
