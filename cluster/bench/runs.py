"""One benchmark run per concurrency: requests into the cluster, or one batch into transformers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
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
    done_s: list[float] = field(default_factory=list)  # per request: from the run's start to when its reply is complete

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


def run_cluster(coordinator: Any, prompts: list[list[int]], output_len: int | list[int]) -> RunResult:
    """All prompts sent at once as separate requests, as concurrent users send them; output_len
    is every request's, or each one's."""
    lengths = output_len if isinstance(output_len, list) else [output_len] * len(prompts)

    async def one(prompt: list[int], n: int) -> tuple[float, list[float]]:
        start = time.time()
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return start, [token.time for token in await coordinator.generate_timed.remote(prompt, params)]

    async def all_requests() -> list[tuple[float, list[float]]]:
        return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths, strict=True)))

    start = time.time()
    timings = asyncio.run(all_requests())
    wall = max(times[-1] for _, times in timings) - start
    ttft, tpot = zip(*(per_request(s, times) for s, times in timings))
    done = [times[-1] - start for _, times in timings]
    return RunResult(len(prompts), wall, sum(len(t) for _, t in timings), list(ttft), list(tpot), done)


def load_hf(checkpoint: str | Path, dtype: str) -> Any:
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(str(checkpoint), dtype=getattr(torch, dtype)).eval()


def run_hf(model: Any, prompts: list[list[int]], output_len: int) -> RunResult:
    """transformers' generate on the whole batch (same prompt length: no padding), greedy."""
    start = time.time()
    token_times = hf_generate(model, prompts, output_len)
    ttft, tpot = per_request(start, token_times)
    batch = len(prompts)
    done = [token_times[-1] - start] * batch
    return RunResult(batch, token_times[-1] - start, batch * len(token_times), [ttft] * batch, [tpot] * batch, done)


def hf_generate(model: Any, prompts: list[list[int]], output_len: int) -> list[float]:
    """Greedy generate of exactly output_len tokens for one batch, prompts left-padded to the
    longest (as transformers wants for decoder-only batches); the time each step's tokens came."""
    from transformers.generation.streamers import BaseStreamer

    class StepTimes(BaseStreamer):  # put() gets the prompt once, then each step's new tokens
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.time())

        def end(self) -> None:
            pass

    longest = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    streamer = StepTimes()
    with torch.inference_mode():
        model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            streamer=streamer,
            pad_token_id=0,
        )
    return streamer.times[1:]
