"""Request traces: when each request arrived, how long its prompt was and how many tokens it got.

Two forms are read:

- JSONL, one request a line: `{"timestamp": 0.25, "prompt_tokens": 512, "output_tokens": 128}`, the
  timestamp in seconds from the trace's start;
- CSV of the public Azure LLM inference traces: `TIMESTAMP` (a date-time), `ContextTokens`,
  `GeneratedTokens`; times are taken relative to the first row.

`moe-cluster replay` sends a trace to a running server; the planner will simulate the same trace.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from cluster.errors import UserError

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class TracedRequest:
    timestamp: float  # seconds from the trace's start
    prompt_tokens: int
    output_tokens: int


def read_request_trace(path: Path) -> list[TracedRequest]:
    """The trace's requests in arrival order; UserError, naming the file and line, for anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read a request trace there ({e})") from None
    requests = _azure_csv(path, text) if path.suffix.lower() == ".csv" else _jsonl(path, text)
    if not requests:
        raise UserError(f"{path}: the trace has no requests")
    start = min(r.timestamp for r in requests)  # the trace starts with its first request, in either form
    return sorted((replace(r, timestamp=r.timestamp - start) for r in requests), key=lambda r: r.timestamp)


def _jsonl(path: Path, text: str) -> list[TracedRequest]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number}: expected an object with timestamp, prompt_tokens, output_tokens")
        out.append(_request(path, number, row.get("timestamp"), row.get("prompt_tokens"), row.get("output_tokens")))
    return out


def _azure_csv(path: Path, text: str) -> list[TracedRequest]:
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or any(c not in reader.fieldnames for c in AZURE_COLUMNS):
        raise UserError(f"{path}: an Azure LLM inference trace has the columns {', '.join(AZURE_COLUMNS)}")
    rows: list[tuple[int, datetime, Any, Any]] = []
    for number, row in enumerate(reader, 2):  # line 1 is the header
        try:
            when = datetime.fromisoformat(row["TIMESTAMP"].strip())
        except ValueError:
            raise UserError(f"{path} line {number}: TIMESTAMP {row['TIMESTAMP']!r} is not a date-time") from None
        rows.append((number, when, row["ContextTokens"], row["GeneratedTokens"]))
    if not rows:
        return []
    start, out = rows[0][1], []
    for number, when, prompt, output in rows:
        try:
            offset = (when - start).total_seconds()
        except TypeError:  # one row with a time zone, another without
            raise UserError(f"{path} line {number}: TIMESTAMP {when} and the first row's {start} are not comparable") from None
        out.append(_request(path, number, offset, prompt, output))
    return out


def _request(path: Path, number: int, timestamp: Any, prompt: Any, output: Any) -> TracedRequest:
    where = f"{path} line {number}"
    t = _number(where, "timestamp", timestamp)
    if t < 0:
        raise UserError(f"{where}: timestamp must be seconds from the trace's start, not {timestamp!r}")
    return TracedRequest(t, _count(where, "prompt_tokens", prompt, least=1), _count(where, "output_tokens", output, least=1))


def _number(where: str, name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {name} must be a number, not {value!r}") from None
    if not math.isfinite(number) or isinstance(value, bool):
        raise UserError(f"{where}: {name} must be a number, not {value!r}")
    return number


def _count(where: str, name: str, value: Any, *, least: int) -> int:
    number = _number(where, name, value)
    if number != int(number) or number < least:
        raise UserError(f"{where}: {name} must be a whole number of at least {least}, not {value!r}")
    return int(number)
