"""What a replayed trace got, request by request, and its summary: the report `moe-cluster replay` prints for a
running server and `plan --replay` for its simulation of one, with the same keys.

TTFT is the time to a request's first token, TPOT the time from there to its last over the tokens
after the first, latency the whole request; each at p50, p90 and p99 (nearest rank). Goodput is the
requests a second that met both targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Outcome:
    """One request's fate: its times in seconds, or the error that ended it."""

    sent_at: float  # seconds from the replay's start
    ttft_s: float | None
    tpot_s: float | None  # None for a one-token answer
    latency_s: float | None
    output_tokens: int
    error: str | None = None


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 in ms (nearest rank); None where nothing was measured."""
    ordered = sorted(values)
    return {f"p{q}": 1e3 * ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else None for q in PERCENTILES}


def report(outcomes: list[Outcome], duration_s: float, *, ttft_ms: float, tpot_ms: float) -> dict[str, Any]:
    """The replay's summary: counts, TTFT, TPOT and latency percentiles, throughput and goodput against the targets."""
    done = [o for o in outcomes if o.error is None]
    good = [
        o for o in done if o.ttft_s is not None and 1e3 * o.ttft_s <= ttft_ms and (o.tpot_s is None or 1e3 * o.tpot_s <= tpot_ms)
    ]
    errors = sorted({o.error for o in outcomes if o.error is not None})
    return {
        "requests": len(outcomes),
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "errors": errors[:5],
        "duration_s": duration_s,
        "output_tokens": sum(o.output_tokens for o in done),
        "output_tok_s": sum(o.output_tokens for o in done) / duration_s if duration_s > 0 else 0.0,
        "requests_per_s": len(done) / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": percentiles([o.ttft_s for o in done if o.ttft_s is not None]),
        "tpot_ms": percentiles([o.tpot_s for o in done if o.tpot_s is not None]),
        "latency_ms": percentiles([o.latency_s for o in done if o.latency_s is not None]),
        "targets": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
        "goodput_requests_per_s": len(good) / duration_s if duration_s > 0 else 0.0,
        "goodput_fraction": len(good) / len(outcomes),
    }


def report_text(summary: dict[str, Any]) -> str:
    def row(name: str) -> str:
        values = summary[name]
        return f"{name.removesuffix('_ms'):>7}: " + ", ".join(
            f"{q} {v:.1f} ms" if v is not None else f"{q} -" for q, v in values.items()
        )

    targets = summary["targets"]
    lines = [
        f"{summary['requests']} requests, {summary['completed']} completed, {summary['failed']} failed "
        f"in {summary['duration_s']:.1f} s",
        row("ttft_ms"),
        row("tpot_ms"),
        row("latency_ms"),
        f"throughput: {summary['output_tok_s']:.1f} output tok/s, {summary['requests_per_s']:.2f} requests/s",
        f"goodput: {summary['goodput_requests_per_s']:.2f} requests/s ({100 * summary['goodput_fraction']:.0f}% of requests) "
        f"within TTFT {targets['ttft_ms']:g} ms and TPOT {targets['tpot_ms']:g} ms",
    ]
    lines += [f"error: {e}" for e in summary["errors"]]
    return "\n".join(lines)
