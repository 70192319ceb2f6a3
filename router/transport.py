"""[Dispatch] transports: how a layer's per-expert token batches reach the experts and come back.

A transport gets, for one layer, a dict expert -> tokens [T_e, D] holding only busy experts, and
returns expert -> output [T_e, D]. It must issue one batched call per busy expert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch


class ExpertTransport(Protocol):
    def run(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]: ...


class ExpertLike(Protocol):
    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...


class LocalTransport:
    """Experts in this process: the baseline and the test double for the Ray path."""

    def __init__(self, experts: Sequence[ExpertLike]) -> None:
        self.experts = experts

    def run(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {e: self.experts[e].forward(layer, x) for e, x in inputs.items()}


class RayActorTransport:
    """Experts as Ray actors: all busy workers are called at once, then gathered."""

    def __init__(self, workers: Sequence[Any]) -> None:
        self.workers = workers

    def run(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        import ray

        refs = {e: self.workers[e].forward.remote(layer, x) for e, x in inputs.items()}
        outputs = ray.get(list(refs.values()))
        return dict(zip(refs, outputs))
