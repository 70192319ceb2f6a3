"""Where an engine step's time goes: each part timed where it happens, none computed as a remainder.

    schedule   the scheduler choosing the step's sequences and their KV blocks    (cluster.engine.core)
    prepare    the step's grids, positions and embeddings                        (cluster.model_runner)
    attention  per layer: the norms and attention over the paged cache          (cluster.model_runner)
    mlp        per layer: a dense model's feed-forward                           (mixtral.feed_forward)
    dispatch   per layer: the router, the pieces and sending them to the workers (router.moe_block)
    wait       per layer: until every busy worker has answered                   (router.moe_block)
    combine    per layer: the weighted sum back in token order, and its observers (router.moe_block)
    head       the final norm and the lm_head                                    (cluster.model_runner)
    sample     sampling, logprobs and the KV cache's bookkeeping of the step     (cluster.engine.core)
    finish     appending tokens, finishing sequences                             (cluster.engine.core)

`step` is the whole of EngineCore.step, timed around it: the parts' sum over it says how much of a
step the parts account for (the rest is the Python between them).

On a GPU, when asked (EngineOptions.synchronized_timing, which `bench --breakdown` sets), the clock
synchronises the device at each part's start and end, so that a part's kernels are counted in it and
not in whichever later part first waits for them. Serving leaves it off: it would cost the overlap of
kernel launches with the kernels, which a dense model's layers have.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

PARTS = ("schedule", "prepare", "attention", "mlp", "dispatch", "wait", "combine", "head", "sample", "finish")


def synchronizer(device: torch.device) -> Callable[[], None] | None:
    """What waits for `device`'s queued work: torch.cuda.synchronize of that device on a GPU, nothing on a CPU."""
    return functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None


class StepClock:
    """Seconds per part since the last reset, and the steps they were spent in. `synchronize`, if
    given, is called at each part's start and end (synchronizer)."""

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.synchronize = synchronize
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys((*PARTS, "step"), 0.0)
        self.steps = 0

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds

    @contextmanager
    def timing(self, part: str) -> Iterator[None]:
        if self.synchronize is not None:
            self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize is not None:
                self.synchronize()
            self.seconds[part] += time.perf_counter() - start

    def report(self) -> dict[str, float]:
        """Milliseconds per step of each part and of the whole step, and the share the parts account for."""
        per_step = {part: 1e3 * s / self.steps if self.steps else 0.0 for part, s in self.seconds.items()}
        timed = sum(self.seconds[p] for p in PARTS)
        return per_step | {"steps": self.steps, "accounted": timed / self.seconds["step"] if self.seconds["step"] else 0.0}
