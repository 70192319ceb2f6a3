"""One benchmark run per concurrency: requests into the cluster, or one batch into transformers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.engine.sampling import SamplingParams


@dataclass(frozen=True)
class RunResult:
    concurrency: int
    wall_s: float
    output_tokens: int
    ttft_s: list[float]  # per request
    tpot_s: list[float]  # per request: (last token - first token) / (tokens - 1)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median_run(runs: list[RunResult]) -> RunResult:
    """The run with the median tokens/s."""
    return sorted(runs, key=lambda r: r.tok_s)[len(runs) // 2]


def per_request(start: float, token_times: list[float]) -> tuple[float, float]:
    tpot = (token_times[-1] - token_times[0]) / (len(token_times) - 1) if len(token_times) > 1 else 0.0
    return token_times[0] - start, tpot


def run_cluster(coordinator: Any, prompts: list[list[int]], output_len: int) -> RunResult:
    """All prompts sent at once as separate requests, as concurrent users send them."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)

    async def one(prompt: list[int]) -> tuple[float, list[float]]:
        start = time.time()
        return start, [token.time for token in await coordinator.generate_timed.remote(prompt, params)]

    async def all_requests() -> list[tuple[float, list[float]]]:
        return await asyncio.gather(*(one(p) for p in prompts))

    start = time.time()
    timings = asyncio.run(all_requests())
    wall = max(times[-1] for _, times in timings) - start
    ttft, tpot = zip(*(per_request(s, times) for s, times in timings))
    return RunResult(len(prompts), wall, sum(len(t) for _, t in timings), list(ttft), list(tpot))


def load_hf(checkpoint: str | Path, dtype: str) -> Any:
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(str(checkpoint), dtype=getattr(torch, dtype)).eval()


def run_hf(model: Any, prompts: list[list[int]], output_len: int) -> RunResult:
    """transformers' generate on the whole batch (same prompt length: no padding), greedy."""
    from transformers.generation.streamers import BaseStreamer

    class StepTimes(BaseStreamer):  # put() gets the prompt once, then each step's new tokens
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.time())

        def end(self) -> None:
            pass

    streamer = StepTimes()
    input_ids = torch.tensor(prompts)
    start = time.time()
    with torch.inference_mode():
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            streamer=streamer,
            pad_token_id=0,
        )
    token_times = streamer.times[1:]
    ttft, tpot = per_request(start, token_times)
    batch = len(prompts)
    return RunResult(batch, token_times[-1] - start, batch * len(token_times), [ttft] * batch, [tpot] * batch)
