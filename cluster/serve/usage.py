"""Tokens used by model and by user (the OpenAI `user` field), for GET /v1/engine/stats.

Users are counted here, not as Prometheus labels: a label per user would grow a time series for every user
ever seen. The book counts up to `max_tracked_users` users exactly; users past that share one "others" row,
so memory stays bounded however many users a deployment meets, and every sum stays exact.
Requests without a `user` (or with an empty one) are one row whose user is None (null in the JSON); it is
always tracked and does not count against `max_tracked_users`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster.errors import UserError


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, requests: int, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests += requests
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, int]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


class UsageBook:
    """Requests and tokens since the book started, by served model and by user; the report shows the
    `top_users` users that used the most tokens and sums the rest."""

    def __init__(self, top_users: int = 20, max_tracked_users: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        if top_users < 0 or max_tracked_users < 0:
            raise UserError(f"top_users ({top_users}) and max_tracked_users ({max_tracked_users}) must be 0 or more")
        self.top_users = top_users
        self.max_tracked_users = max_tracked_users
        self.clock = clock
        self.started = clock()
        self.models: dict[str, Usage] = {}  # served models only, a fixed few
        self.users: dict[str | None, Usage] = {}
        self.untracked = Usage()  # users met once max_tracked_users were tracked

    def record(self, model: str, user: str | None, prompt_tokens: int, completion_tokens: int) -> None:
        """One request that finished (or ended early): `model` is the served model, after any route's alias."""
        self.models.setdefault(model, Usage()).add(1, prompt_tokens, completion_tokens)
        key = user or None  # an empty `user` names no one, as an absent one
        row = self.users.get(key)
        if row is None:
            named = len(self.users) - (None in self.users)
            if key is not None and named >= self.max_tracked_users:
                row = self.untracked
            else:
                row = self.users[key] = Usage()
        row.add(1, prompt_tokens, completion_tokens)

    def report(self) -> dict[str, Any]:
        """The JSON for /v1/engine/stats: the top users and "others" add up to the models' totals exactly."""
        # Most tokens first; ties in the order of the user's name (None, no user, as "").
        ranked = sorted(self.users.items(), key=lambda item: (-item[1].total_tokens, item[0] or ""))
        top, rest = ranked[: self.top_users], ranked[self.top_users :]
        others = Usage(**self.untracked.to_json())
        for _, usage in rest:
            others.add(usage.requests, usage.prompt_tokens, usage.completion_tokens)
        return {
            "window_s": self.clock() - self.started,
            "models": {name: usage.to_json() for name, usage in sorted(self.models.items())},
            "users": {
                "top": [{"user": user} | usage.to_json() for user, usage in top],
                # `users` counts the tracked users summed here; `untracked` says more users, past
                # max_tracked_users, are summed here too, and were not counted one by one.
                "others": {"users": len(rest), "untracked": self.untracked.requests > 0} | others.to_json(),
                "tracked": len(self.users),
            },
        }

    @staticmethod
    def monthly_volumes(report: dict[str, Any], *, hours_per_month: float = 730) -> dict[str, float]:
        """Completion (output) tokens a month by model, at the rate the report measured over its window."""
        window_s = report["window_s"]
        if not window_s > 0:
            raise UserError(f"the usage window is {window_s} s long; ask for the report again once the server has run")
        if not hours_per_month > 0:
            raise UserError(f"hours_per_month must be above 0, not {hours_per_month}")
        seconds_per_month = hours_per_month * 3600
        return {name: usage["completion_tokens"] / window_s * seconds_per_month for name, usage in report["models"].items()}
