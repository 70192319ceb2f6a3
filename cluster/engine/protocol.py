"""The engine as the serving layer sees it: a narrow interface, passed in.

The Serve ingress reaches the engine replica through a DeploymentHandle (cluster.serve.ingress);
tests pass a fake with the same contract, so the HTTP and gRPC edges run in seconds without Ray.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from cluster.engine.sampling import SamplingParams


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of a request; the last event of a stream has a finish_reason."""

    token_id: int  # -1 on an "error" event, which carries no token
    logprob: float
    top_logprobs: list[tuple[int, float]]  # empty unless the request asked for logprobs (or scored label tokens)
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" on the last event


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: the client should retry later (HTTP 503 with Retry-After)."""


class EngineUnavailable(RuntimeError):
    """The engine cannot serve now (its loop died, its replica is going away): HTTP 503."""


@dataclass(frozen=True)
class ModelInfo:
    max_model_len: int
    vocab_size: int
    moe: bool = True  # False: a dense model, which has no expert load, map or rebalancing


class EngineClient(Protocol):
    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        """Tokens of one checked request as they are made. Closing the stream early aborts the request."""
        ...

    async def model_info(self) -> ModelInfo: ...

    async def expert_load(self) -> dict[str, Any]:
        """The load-balancing report since start (router.load.ExpertLoad.report, plus per-worker stats)."""
        ...

    async def stats(self) -> dict[str, Any]:
        """Running and waiting sequences, steps, preemptions, KV blocks (total, free, usage) and prefix-cache hits."""
        ...

    async def metrics(self) -> bytes:
        """Prometheus text exposition of the engine's moe_ series."""
        ...

    async def rebalance(self) -> dict[str, Any]:
        """A new expert map from the load measured since the last rebalance, within the workers' slots,
        applied live (cluster.engine.rebalance.Rebalance.to_json); UserError if there is no load to go on."""
        ...

    async def check_health(self) -> None:
        """Return if the engine can serve; raise if not."""
        ...

    async def shutdown(self) -> None: ...
