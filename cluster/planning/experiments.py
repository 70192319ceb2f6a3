"""Capacity-planning experiments: sweep GPU types x expert skew x decode batch, for one model.

For each point: TPOT, output tokens/s of one replica, GPUs per replica, and $ per million output
tokens with the replica fully used. Written as a Markdown table and a plot per skew.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.planning.cost_model import layout_for, step_seconds
from cluster.planning.hardware import Gpu, Interconnect
from cluster.planning.planner import ACTIVATION_GB
from mixtral.config import ModelArgs


@dataclass(frozen=True)
class Point:
    gpu: str
    skew: float
    batch: int
    gpus: int
    tpot_ms: float
    tok_s: float
    usd_per_million: float


def sweep(
    args: ModelArgs,
    gpus: list[Gpu],
    link: Interconnect,
    *,
    skews: list[float],
    batches: list[int],
    context: int,
    bytes_per_param: int = 2,
) -> list[Point]:
    points = []
    for gpu in gpus:
        layout = layout_for(args, gpu, bytes_per_param, activation_gb=ACTIVATION_GB)
        for skew in skews:
            for batch in batches:
                step = step_seconds(
                    args,
                    gpu,
                    link,
                    layout,
                    tokens=batch,
                    sequences=batch,
                    context=context,
                    bytes_per_param=bytes_per_param,
                    skew=skew,
                )
                tok_s = batch / step
                usd = layout.gpus * gpu.price_per_hour / (tok_s * 3600) * 1e6
                points.append(Point(gpu.name, skew, batch, layout.gpus, 1e3 * step, tok_s, usd))
    return points


def markdown(points: list[Point]) -> str:
    lines = ["| GPU | skew | batch | GPUs | TPOT (ms) | tok/s per replica | $ / M tokens |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {p.gpu} | {p.skew} | {p.batch} | {p.gpus} | {p.tpot_ms:.1f} | {p.tok_s:.0f} | {p.usd_per_million:.2f} |"
        for p in points
    ]
    return "\n".join(lines)


def plot(points: list[Point], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skews = sorted({p.skew for p in points})
    fig, axes = plt.subplots(2, len(skews), figsize=(4.5 * len(skews), 7), squeeze=False)
    for col, skew in enumerate(skews):
        for gpu in dict.fromkeys(p.gpu for p in points):
            series = [p for p in points if p.gpu == gpu and p.skew == skew]
            axes[0][col].plot([p.batch for p in series], [p.usd_per_million for p in series], "o-", label=gpu)
            axes[1][col].plot([p.batch for p in series], [p.tpot_ms for p in series], "o-", label=gpu)
        axes[0][col].set_title(f"expert skew {skew}")
        axes[0][col].set_ylabel("$ per million output tokens")
        axes[1][col].set_ylabel("TPOT (ms)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("decode batch per replica")
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
