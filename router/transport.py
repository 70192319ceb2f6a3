"""[Dispatch] transports: how a layer's per-expert token batches reach the experts and come back.

A transport gets, for one layer, a dict expert -> tokens [T_e, D] holding only busy experts, and
returns expert -> output [T_e, D], with one batched call per busy expert. `submit` starts the
calls and returns at once; `gather` waits for them. The split lets the coordinator work on one
micro-batch while the experts work on the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch


class ExpertTransport(Protocol):
    def submit(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> Any: ...

    def gather(self, pending: Any) -> dict[int, torch.Tensor]: ...


class ExpertLike(Protocol):
    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...


class LocalTransport:
    """Experts in this process: the baseline and the test double for the Ray path. Runs at submit."""

    def __init__(self, experts: Sequence[ExpertLike]) -> None:
        self.experts = experts

    def submit(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {e: self.experts[e].forward(layer, x) for e, x in inputs.items()}

    def gather(self, pending: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return pending


class RayActorTransport:
    """Experts as Ray actors: all busy workers are called at once, gathered later."""

    def __init__(self, workers: Sequence[Any]) -> None:
        self.workers = workers

    def submit(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, Any]:
        return {e: self.workers[e].forward.remote(layer, x) for e, x in inputs.items()}

    def gather(self, pending: dict[int, Any]) -> dict[int, torch.Tensor]:
        import ray

        return dict(zip(pending, ray.get(list(pending.values()))))
