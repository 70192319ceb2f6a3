"""`serve --record-requests PATH`: live traffic as a request trace that `moe-cluster replay` (and the
planner) read back, written afresh at each start: one JSONL line per finished request, `timestamp`
(seconds from the first recorded request's arrival), `prompt_tokens`, `output_tokens`
(cluster.planning.request_trace's form).

Lines are written as requests finish, so they are not in arrival order; readers sort them. A request
that produced no token is not a request a replay could send, and is left out. The file is on the node
the endpoint's ingress runs on (the head).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from cluster.errors import UserError


class RequestLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A new trace per server start: appended to an old one, its times (from this start's first
            # request) would interleave with the old ones'. A line at a time.
            self._file = self.path.open("w", buffering=1, encoding="utf-8")
        except OSError as e:
            raise UserError(f"--record-requests {path}: cannot write there ({e})") from None
        self._start: float | None = None
        self._lock = threading.Lock()

    def arrival(self) -> float:
        """A request arrives now (time.monotonic()): the first one starts the trace."""
        now = time.monotonic()
        with self._lock:
            if self._start is None:
                self._start = now
        return now

    def record(self, arrived: float, prompt_tokens: int, output_tokens: int) -> None:
        """A finished request that arrived at `arrived` (arrival's answer)."""
        if output_tokens < 1 or self._start is None:
            return
        line = {"timestamp": round(arrived - self._start, 6), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens}
        with self._lock:
            self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._file.close()
