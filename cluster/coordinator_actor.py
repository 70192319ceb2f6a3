"""The coordinator as a Ray actor: the model's non-expert part, the KV cache and the engine loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.coordinator import Coordinator
from cluster.engine import Engine
from cluster.sampling import SamplingParams
from mixtral.checkpoint import ReadLog
from router.transport import RayActorTransport
from workers.device import assigned_device, set_threads


@dataclass(frozen=True)
class EngineOptions:
    dtype: str | None = None  # None: the checkpoint's own dtype
    max_num_seqs: int = 64  # cap on running sequences; more wait in a queue
    max_num_batched_tokens: int = 2048  # per-step token budget (decode tokens + prefill chunks)
    max_model_len: int | None = None  # None: the model's max_position_embeddings


def engine_over(coordinator: Coordinator, options: EngineOptions) -> Engine:
    return Engine(
        coordinator, coordinator.cache, eos_token_ids=coordinator.args.eos_token_ids,
        max_num_seqs=options.max_num_seqs, max_num_batched_tokens=options.max_num_batched_tokens,
    )


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class CoordinatorActor:
    def __init__(self, checkpoint: str | Path, workers: list[Any], options: EngineOptions, *, cpu_share: float = 1.0) -> None:
        set_threads(cpu_share)
        self.coordinator = Coordinator(
            checkpoint, RayActorTransport(workers), dtype=options.dtype, max_num_seqs=options.max_num_seqs,
            max_model_len=options.max_model_len, device=assigned_device(),
        )
        self.engine = engine_over(self.coordinator, options)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
        """Run these requests to completion, batched together; results in request order."""
        seqs = self.engine.generate(prompts, params)
        return [GenerationResult(s.output_ids, s.logprobs, s.finish_reason or "length") for s in seqs]

    def expert_load(self) -> list[list[int]]:
        """Tokens routed to each expert, per layer, since start: [L][E]."""
        return self.coordinator.load.snapshot()

    def engine_steps(self) -> int:
        return self.engine.steps

    def read_log(self) -> ReadLog:
        return self.coordinator.read_log()
