"""The engine deployment: a Serve replica that is the coordinator, with its expert workers.

Serve reserves one placement group per replica (placement_group_bundles): the replica runs in
bundle 0, and starts expert worker e in bundle 1 + e. The narrow interface the ingress uses:
`generate` (streamed), `model_info`, `stats`, `check_health`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cluster.async_engine import AsyncEngine
from cluster.coordinator_actor import EngineOptions, channel_transport, engine_over, make_coordinator
from cluster.detokenizer import Detokenizer
from cluster.placement import PlacementOptions, start_workers, wait_loaded
from cluster.sampling import SamplingParams
from mixtral.config import load_args
from mixtral.tokenizer import load_tokenizer
from workers.device import assigned_device, set_coordinator_threads


@dataclass(frozen=True)
class Delta:
    """What one engine step added to a request: new text and tokens; the last one has finish_reason."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None


class EngineServer:
    def __init__(self, checkpoint: str, engine: EngineOptions, placement: PlacementOptions, gpus: bool) -> None:
        import ray

        set_coordinator_threads(placement.coordinator_threads)
        args = load_args(checkpoint)
        pg = ray.util.get_current_placement_group()
        workers = start_workers(checkpoint, args, pg, dtype=engine.dtype, placement=placement, gpus=gpus)
        wait_loaded([w.info.remote() for w in workers], progress=False)
        self.coordinator = make_coordinator(checkpoint, channel_transport(workers), engine, device=assigned_device())
        self.engine = AsyncEngine(engine_over(self.coordinator, engine), self.coordinator.telemetry)
        self.tokenizer = load_tokenizer(checkpoint)
        self.workers = workers

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        """Stream a request's output. Stop strings end it early; a cancelled stream aborts it."""
        detokenizer = Detokenizer(self.tokenizer, params.stop)
        stream = self.engine.stream(prompt_ids, params, request_id)
        async with contextlib.aclosing(stream):  # closing an unfinished stream aborts the request
            async for event in stream:
                if event.finish_reason == "error":
                    yield Delta(detokenizer.flush(), [], [], [], "error")
                    return
                text = detokenizer.add(event.token_id)
                finish = event.finish_reason or ("stop" if detokenizer.stopped else None)
                if finish:
                    text += detokenizer.flush()
                top = [event.top_logprobs] if params.logprobs else []
                yield Delta(text, [event.token_id], [event.logprob], top, finish)
                if finish:
                    return

    def model_info(self) -> dict[str, Any]:
        return {"max_model_len": self.coordinator.max_model_len, "vocab_size": self.coordinator.vocab_size}

    def stats(self) -> dict[str, Any]:
        """Running and waiting sequences and engine steps so far."""
        return self.engine.stats()

    async def expert_load(self) -> dict[str, Any]:
        """Load-balancing report since start: per layer and expert, and per worker."""
        workers = await asyncio.gather(*(w.worker_stats.remote() for w in self.workers))
        return self.coordinator.load.report() | {"workers": [
            {"expert": w.expert, "calls": w.calls, "forward_ms": 1e3 * w.forward_seconds, "bytes_in": w.bytes_in,
             "bytes_out": w.bytes_out} for w in workers
        ]}

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("the engine loop thread has stopped")
