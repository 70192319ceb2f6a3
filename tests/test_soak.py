"""A short soak in the suite (tests/soak.py draws the requests and counts the endings): 300 mixed
requests from 16 clients while expert workers are SIGKILLed three times and one of the two engine
replicas once. Every request ends as its kind allows, the engines come back to no sequence and no
KV block held, and each replica's resident memory stays within 10% of a warmed-up fresh replica's
(tests/soak.py; Serve is shut down after)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.soak import FaultPlan, memory_problems, request_mix, serve_args, served, soak, summary

REQUESTS, CLIENTS, WARM_UP = 300, 16, 400  # a warm-up past the allocator's first-use growth (docs/operations.md#soak)
FAULTS = FaultPlan(worker_kills=3, replica_kills=1)


def test_mixed_requests_under_worker_and_replica_kills_end_as_asked_and_leave_nothing_behind(
    ray_session: int, make_ckpt: Callable[..., Path]
) -> None:
    checkpoint = make_ckpt(tokenizer=True, vocab_size=32000)
    with served(serve_args(checkpoint, clients=CLIENTS)) as port:
        report = soak(port, request_mix(REQUESTS, seed=0), clients=CLIENTS, faults=FAULTS, warm_up=WARM_UP)
    print(summary(report))  # the figures, with -s or on failure
    assert len(report.requests) == REQUESTS
    assert report.lost() == []
    assert sorted(kind for kind, _ in report.faults) == ["replica", "worker", "worker", "worker"]
    endings = report.by_outcome()
    assert endings["completed"] and endings["timed out"] and endings["cancelled"] and endings["refused"], endings
    assert memory_problems(report) == [], summary(report)
