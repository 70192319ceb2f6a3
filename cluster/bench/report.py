"""Benchmark results for people (a table and a plot) and for machines (JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.bench.runs import RunResult, median_run, percentile


def result_row(c: int, cluster_runs: list[RunResult], baseline_runs: list[RunResult], floor_s: float) -> dict[str, Any]:
    """One level: the runs with the median tokens/s of each side, and the spread of the ratio over
    the pairs of runs taken one after the other (baseline_runs is empty without a baseline)."""
    cluster = median_run(cluster_runs)
    row: dict[str, Any] = {
        "concurrency": c,
        "tok_s": cluster.tok_s,
        "ttft_p50_ms": 1e3 * percentile(cluster.ttft_s, 50),
        "ttft_p99_ms": 1e3 * percentile(cluster.ttft_s, 99),
        "tpot_p50_ms": 1e3 * percentile(cluster.tpot_s, 50),
        "tpot_p99_ms": 1e3 * percentile(cluster.tpot_s, 99),
        "floor_step_ms": 1e3 * floor_s,
        # The fraction of this machine's decode floor reached: floor step time over measured TPOT.
        "floor_fraction": floor_s / percentile(cluster.tpot_s, 50) if percentile(cluster.tpot_s, 50) else 0.0,
    }
    if baseline_runs:
        baseline = median_run(baseline_runs)
        row |= {
            "baseline_tok_s": baseline.tok_s,
            "baseline_ttft_p50_ms": 1e3 * percentile(baseline.ttft_s, 50),
            "baseline_tpot_p50_ms": 1e3 * percentile(baseline.tpot_s, 50),
            "ratio": cluster.tok_s / baseline.tok_s,
            "pair_ratios": [ours.tok_s / theirs.tok_s for ours, theirs in zip(cluster_runs, baseline_runs)],
        }
    return row


def llamacpp_fields(cluster_runs: list[RunResult], llama_runs: list[RunResult]) -> dict[str, Any]:
    """llama.cpp's side of one level (nothing where it did not run): its median run, and ours over it."""
    if not llama_runs:
        return {}
    theirs = median_run(llama_runs)
    return {
        "llamacpp_tok_s": theirs.tok_s,
        "llamacpp_ttft_p50_ms": 1e3 * percentile(theirs.ttft_s, 50),
        "llamacpp_tpot_p50_ms": 1e3 * percentile(theirs.tpot_s, 50),
        "llamacpp_ratio": median_run(cluster_runs).tok_s / theirs.tok_s,
    }


def table(rows: list[dict[str, Any]]) -> str:
    has_baseline = "baseline_tok_s" in rows[0]
    has_llamacpp = any("llamacpp_tok_s" in r for r in rows)
    head = ["concurrency", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "floor", "of floor"]
    if has_baseline:
        head += ["hf tok/s", "hf TTFT", "hf TPOT", "ratio"]
    if has_llamacpp:
        head += ["llama.cpp tok/s", "llama.cpp TTFT", "llama.cpp TPOT", "vs llama.cpp"]
    lines = [head]
    for r in rows:
        line = [
            str(r["concurrency"]),
            f"{r['tok_s']:.1f}",
            f"{r['ttft_p50_ms']:.0f} ms",
            f"{r['ttft_p99_ms']:.0f} ms",
            f"{r['tpot_p50_ms']:.1f} ms",
            f"{r['tpot_p99_ms']:.1f} ms",
            f"{r['floor_step_ms']:.1f} ms",
            f"{100 * r['floor_fraction']:.0f}%",
        ]
        if has_baseline:
            pairs = r["pair_ratios"]
            spread = f" ({min(pairs):.2f}-{max(pairs):.2f})" if len(pairs) > 1 else ""
            line += [
                f"{r['baseline_tok_s']:.1f}",
                f"{r['baseline_ttft_p50_ms']:.0f} ms",
                f"{r['baseline_tpot_p50_ms']:.1f} ms",
                f"{r['ratio']:.2f}x{spread}",
            ]
        if has_llamacpp:
            line += (
                [
                    f"{r['llamacpp_tok_s']:.1f}",
                    f"{r['llamacpp_ttft_p50_ms']:.0f} ms",
                    f"{r['llamacpp_tpot_p50_ms']:.1f} ms",
                    f"{r['llamacpp_ratio']:.2f}x",
                ]
                if "llamacpp_tok_s" in r
                else ["-"] * 4
            )
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join(" | ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in lines)


def plot(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(c, [r["tok_s"] for r in rows], "o-", label="moe-cluster")
    right.plot(c, [r["tpot_p50_ms"] for r in rows], "o-", label="moe-cluster")
    if "baseline_tok_s" in rows[0]:
        left.plot(c, [r["baseline_tok_s"] for r in rows], "s--", label="transformers generate")
        right.plot(c, [r["baseline_tpot_p50_ms"] for r in rows], "s--", label="transformers generate")
    llama = [r for r in rows if "llamacpp_tok_s" in r]
    if llama:
        left.plot([r["concurrency"] for r in llama], [r["llamacpp_tok_s"] for r in llama], "^", label="llama.cpp")
        right.plot([r["concurrency"] for r in llama], [r["llamacpp_tpot_p50_ms"] for r in llama], "^", label="llama.cpp")
    right.plot(c, [r["floor_step_ms"] for r in rows], ":", color="gray", label="machine floor")
    for ax, label in ((left, "output tokens/s"), (right, "TPOT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    """Per level, the reported run's mean step and where it went, in ms (mixtral.step_clock), and the
    share of the step the timed parts account for."""
    from mixtral.step_clock import PARTS

    parts = [p for p in PARTS if any(r["breakdown"][p] for r in rows)]
    lines = [["concurrency", "step", *parts, "accounted"]]
    for r in rows:
        b = r["breakdown"]
        lines.append([str(r["concurrency"]), f"{b['step']:.2f}", *(f"{b[p]:.2f}" for p in parts), f"{b['accounted']:.0%}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    text = "\n".join(" | ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in lines)
    return "where a step's time goes (ms per step; wait includes the busiest worker's compute):\n" + text
