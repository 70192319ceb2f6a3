"""The per-layer feed-forward, a part the model chooses.

    Mistral (dense)   y = down(silu(gate m) * up m)           DenseMLP, here, on the coordinator's device
    Mixtral (sparse)  y = sum_e w_e(m) SwiGLU_e(m), top-k     router.moe_block.MoEBlock, over expert workers

The model runner (cluster.model_runner) runs attention and the KV cache for both and calls the
feed-forward it was given through this protocol: `start` a layer's call, then `finish` it. A
feed-forward whose `start` returns before its answer is made (experts on other processes) lets the
runner run another micro-batch's attention meanwhile; `step` brackets one engine step's calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from mixtral import names
from mixtral.layers import linear, linear_weight
from mixtral.step_clock import StepClock


class FeedForward(Protocol):
    overlaps: bool  # `start` returns before the answer is made: the runner overlaps micro-batches

    def step(self) -> contextlib.AbstractContextManager[None]:
        """One engine step's calls (the MoE fixes its expert map for the step, and abandons a failed step's calls)."""
        ...

    def start(self, layer: int, x: torch.Tensor) -> Any:
        """Begin layer `layer`'s feed-forward of x [T, D]; what `finish` takes."""
        ...

    def finish(self, pending: Any) -> torch.Tensor:
        """The feed-forward's output [T, D] of a started call."""
        ...


# Builds the feed-forward from the coordinator's weights (it takes its own out of the dict), its
# matrices packed for oneDNN's GEMM where the runner packs its own (mixtral.layers.linear_weight), timing
# its parts on the runner's clock (mixtral.step_clock).
FeedForwardFactory = Callable[[dict[str, torch.Tensor], bool, StepClock], FeedForward]


class DenseMLP:
    """Mistral's feed-forward: every token through the layer's one SwiGLU MLP, on the coordinator's device."""

    overlaps = False

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], clock: StepClock | None = None) -> None:
        self.layers = layers  # per layer: gate_proj, up_proj, down_proj as linear_weight holds them
        self.clock = clock or StepClock()

    @staticmethod
    def of(weights: dict[str, torch.Tensor], num_layers: int, *, packed: bool, clock: StepClock | None = None) -> DenseMLP:
        """From the checkpoint's mlp.{gate,up,down}_proj, each dropped from `weights` as it is packed."""

        def take(layer: int, suffix: str) -> torch.Tensor:
            return linear_weight(weights.pop(names.layer_weight(layer, suffix)), packed=packed)

        gate, up, down = names.MLP
        return DenseMLP([(take(layer, gate), take(layer, up), take(layer, down)) for layer in range(num_layers)], clock)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        yield

    def start(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.layers[layer]
        with self.clock.timing("mlp"):
            return linear(F.silu(linear(x, gate)) * linear(x, up), down)

    def finish(self, pending: torch.Tensor) -> torch.Tensor:
        return pending
