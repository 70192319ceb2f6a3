"""The mixed workload: requests of different prompt and output lengths, all arriving at once.

It shows what continuous batching buys. The cluster admits each request as room frees and ends
each at its own length. transformers' generate, run the way a user without a server runs it,
takes static batches of the same requests (left-padded to their longest prompt), and each batch
runs until its longest member is done; a request's reply is complete when its batch returns.
The two take turns in one run, cluster first, as in the equal-length benchmark.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.bench.runs import RunResult, hf_generate, per_request, percentile


@dataclass(frozen=True)
class MixedRequest:
    prompt: list[int]
    output_len: int


def mixed_requests(count: int, *, max_prompt: int, max_output: int, vocab_size: int, seed: int) -> list[MixedRequest]:
    """Prompt lengths uniform in [max_prompt / 16, max_prompt], outputs in [max_output / 16, max_output], seeded."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(max(1, max_prompt // 16), max_prompt + 1, (count,), generator=g).tolist()
    output_lens = torch.randint(max(2, max_output // 16), max_output + 1, (count,), generator=g).tolist()
    return [
        MixedRequest([1] + torch.randint(3, vocab_size, (p - 1,), generator=g).tolist(), o)
        for p, o in zip(prompt_lens, output_lens)
    ]


def run_hf_static(model: Any, requests: list[MixedRequest], batch_size: int) -> RunResult:
    """The requests in arrival order, batch_size at a time, each batch until its longest output is done."""
    start = time.time()
    ttft, tpot, done = [], [], []
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        times = hf_generate(model, [r.prompt for r in batch], max(r.output_len for r in batch))
        for r in batch:
            t, p = per_request(start, times[: r.output_len])
            ttft.append(t)
            tpot.append(p)
            done.append(times[-1] - start)
    wall = max(done)
    return RunResult(len(requests), wall, sum(r.output_len for r in requests), ttft, tpot, done)


def mixed_row(cluster: RunResult, baseline: RunResult | None, engine_stats: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "requests": cluster.concurrency,
        "output_tokens": cluster.output_tokens,
        "tok_s": cluster.tok_s,
        "wall_s": cluster.wall_s,
        "ttft_p50_ms": 1e3 * percentile(cluster.ttft_s, 50),
        "ttft_p99_ms": 1e3 * percentile(cluster.ttft_s, 99),
        "tpot_p50_ms": 1e3 * percentile(cluster.tpot_s, 50),
        "done_p50_s": percentile(cluster.done_s, 50),
        "done_s": cluster.done_s,
        "preemptions": engine_stats["preemptions"],
        "prefix_cache_hit_rate": engine_stats["prefix_cache_hit_rate"],
    }
    if baseline is not None:
        row |= {
            "baseline_tok_s": baseline.tok_s,
            "baseline_wall_s": baseline.wall_s,
            "baseline_ttft_p50_ms": 1e3 * percentile(baseline.ttft_s, 50),
            "baseline_tpot_p50_ms": 1e3 * percentile(baseline.tpot_s, 50),
            "baseline_done_p50_s": percentile(baseline.done_s, 50),
            "baseline_done_s": baseline.done_s,
            "ratio": cluster.tok_s / baseline.tok_s,
        }
    return row


def mixed_table(row: dict[str, Any], hf_batch_size: int | None) -> str:
    lines = [
        f"{row['requests']} requests, {row['output_tokens']} output tokens",
        f"moe-cluster: {row['tok_s']:.1f} tok/s, all done in {row['wall_s']:.1f} s, half done by {row['done_p50_s']:.1f} s, "
        f"TTFT p50 {row['ttft_p50_ms']:.0f} ms, TPOT p50 {row['tpot_p50_ms']:.1f} ms, {row['preemptions']} preempted",
    ]
    if "baseline_tok_s" in row:
        lines.append(
            f"transformers, static batches of {hf_batch_size}: {row['baseline_tok_s']:.1f} tok/s, all done in "
            f"{row['baseline_wall_s']:.1f} s, half done by {row['baseline_done_p50_s']:.1f} s, "
            f"TTFT p50 {row['baseline_ttft_p50_ms']:.0f} ms, TPOT p50 {row['baseline_tpot_p50_ms']:.1f} ms"
        )
        lines.append(f"ratio: {row['ratio']:.2f}x")
    return "\n".join(lines)


def plot_mixed(row: dict[str, Any], out: Path, title: str) -> Path:
    """Requests complete over time: continuous batching finishes short requests early."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in (("done_s", "moe-cluster", "-"), ("baseline_done_s", "transformers static batches", "--")):
        if key in row:
            times = sorted(row[key])
            ax.step([0.0, *times], range(len(times) + 1), style, where="post", label=label)
    ax.set_xlabel("seconds since all requests arrived")
    ax.set_ylabel("requests complete")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_mixed(report: dict[str, Any], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    plot_mixed(report["results"][0], out / "bench.png", title)
