"""A server's measured usage as monthly volumes, for pricing the tiers at them (`plan --usage`).

The report is GET /v1/engine/stats's `usage` (cluster.serve.usage.UsageBook.report): tokens by served
model over `window_s` seconds. A model's monthly volume is its output tokens at that rate, kept up for
a month (cluster.serve.usage.UsageBook.monthly_volumes computes the same; the planner does not import
the server).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import UserError
from cluster.planning.planner import HOURS_PER_MONTH, SECONDS_PER_MONTH, TierPlan


@dataclass(frozen=True)
class MeasuredUsage:
    """Output tokens a month by served model, at the rate a server's usage report measured over its window
    (cluster.serve.usage.UsageBook.monthly_volumes computes the same; the planner does not import the server)."""

    source: str  # where the report came from, for messages and the table
    window_s: float
    volumes: dict[str, float]  # served model -> completion tokens a month

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "window_s": self.window_s, "hours_per_month": HOURS_PER_MONTH, "volumes": self.volumes}


def _count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def usage_of(report: Any, source: str) -> MeasuredUsage:
    """The monthly volumes of a usage report: GET /v1/engine/stats's answer, its `usage` object, or
    `moe-cluster stats --json`'s output; UserError, one line naming `source`, saying what is wrong."""
    usage = report
    if isinstance(report, dict) and isinstance(report.get("engine"), dict) and "usage" not in report:
        usage = report["engine"]  # `moe-cluster stats --json`: the engine's stats under "engine"
    if isinstance(usage, dict) and "usage" in usage:
        usage = usage["usage"]
    if not isinstance(usage, dict) or not ("window_s" in usage or "models" in usage):
        raise UserError(
            f"{source} has no usage report: give a saved GET /v1/engine/stats answer, or its 'usage' object "
            "(with 'window_s' and 'models')"
        )
    window_s = usage.get("window_s")
    if window_s is None:
        raise UserError(f"{source}: the usage report has no 'window_s' (the seconds its counts were measured over)")
    if not _count(window_s) or window_s <= 0:
        raise UserError(
            f"{source}: usage window_s is {window_s!r}; it must be a positive number of seconds "
            "(save the stats again once the server has run a while)"
        )
    models = usage.get("models")
    if not isinstance(models, dict):
        raise UserError(f"{source}: the usage report has no 'models' object (tokens by served model)")
    if not models:
        raise UserError(f"{source}: the usage report counts no model: no request finished in its window")
    volumes = {}
    for name, counts in models.items():
        if not isinstance(counts, dict) or "completion_tokens" not in counts:
            raise UserError(f"{source}: usage models[{name!r}] has no 'completion_tokens'")
        for key in ("requests", "prompt_tokens", "completion_tokens"):
            value = counts.get(key, 0)
            if not _count(value):
                raise UserError(f"{source}: usage models[{name!r}].{key} is {value!r}, not a number")
            if value < 0:
                raise UserError(f"{source}: usage models[{name!r}].{key} is {value}; a count cannot be negative")
        volumes[name] = counts["completion_tokens"] / window_s * SECONDS_PER_MONTH
    return MeasuredUsage(source, float(window_s), volumes)


def read_usage(path: Path) -> MeasuredUsage:
    """usage_of a file; UserError when it is missing, unreadable or not JSON."""
    source = f"--usage {path}"
    if not path.is_file():
        raise UserError(
            f"{source} {'is not a file' if path.exists() else 'does not exist'}; "
            "save a server's GET /v1/engine/stats answer there (or `moe-cluster stats --json`'s output)"
        )
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{source} cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{source} is not JSON ({e})") from None
    return usage_of(report, source)


def _tokens(n: float) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n / 1e3:,.1f}k" if n >= 1e3 else f"{n:,.0f}"


def usage_table(plans: list[TierPlan], usage: MeasuredUsage) -> str:
    """Each tier priced at each served model's measured volume, one line a model, as the table's "per month" line."""
    hours = usage.window_s / 3600
    head = f"per month at the measured usage ({usage.source}: output tokens over {hours:,.2f} h, at that rate for"
    lines = [f"{head} {HOURS_PER_MONTH} h):"]
    for model, tokens in usage.volumes.items():
        rows = [(p.tier, next(m for m in p.usage_monthly if m["model"] == model)) for p in plans]
        priced = "; ".join(
            f"{tier} {m['gpus']:.0f} GPUs ${m['usd']:,.0f}"
            + (f" (${m['usd_per_million']:,.2f}/M)" if m["usd_per_million"] is not None else "")
            for tier, m in rows
        )
        lines.append(f"  {model}: {_tokens(tokens)} tokens: {priced}")
    return "\n".join(lines)
