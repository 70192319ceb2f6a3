"""`plan --replay`: a request trace run through a model of the engine on a profiled machine, step by step.

Each replica is the engine's continuous batching (cluster.engine.scheduler) in miniature: requests
join the running batch in arrival order up to `max_num_seqs`; a step takes one token of every
sequence past its prompt, then prompt chunks in order up to the step's token budget (chunked
prefill); a sequence's first token comes at the end of the step that finishes its prompt, each next
one a step later. A step of T tokens over S sequences takes cluster.planning.local.step_ms on the
profile. Requests go to the replicas in turn, as arrivals spread over equal replicas.

Not modelled: preemption when the KV cache is full (the cache is taken to hold every admitted
sequence), the moderation judge's requests, and sampling or stop strings ending a request early.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cluster.planning.local import step_ms
from cluster.planning.profile import Profile
from cluster.planning.request_trace import TracedRequest
from cluster.planning.trace_report import Outcome
from mixtral.config import ModelArgs


@dataclass
class _Sequence:
    request: TracedRequest
    prompt_left: int
    token_times: list[float] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.token_times) >= self.request.output_tokens


def simulate(
    args: ModelArgs,
    profile: Profile,
    requests: list[TracedRequest],
    *,
    replicas: int = 1,
    max_num_seqs: int = 64,
    skew: float = 1.0,
) -> tuple[list[Outcome], float]:
    """(each request's outcome in trace order, seconds from the first arrival to the last token)."""
    ordered = sorted(range(len(requests)), key=lambda i: requests[i].timestamp)
    shares: list[list[int]] = [ordered[r::replicas] for r in range(replicas)]
    outcomes: dict[int, Outcome] = {}
    for share in shares:
        outcomes |= _replica(args, profile, [(i, requests[i]) for i in share], max_num_seqs=max_num_seqs, skew=skew)
    start = min(r.timestamp for r in requests)
    end = max(o.sent_at + (o.latency_s or 0.0) for o in outcomes.values())
    return [outcomes[i] for i in range(len(requests))], end - start


def _replica(
    args: ModelArgs, profile: Profile, arrivals: list[tuple[int, TracedRequest]], *, max_num_seqs: int, skew: float
) -> dict[int, Outcome]:
    pending = deque(arrivals)
    waiting: deque[tuple[int, _Sequence]] = deque()
    running: list[tuple[int, _Sequence]] = []
    outcomes: dict[int, Outcome] = {}
    now = 0.0
    while pending or waiting or running:
        if not waiting and not running:
            now = max(now, pending[0][1].timestamp)
        while pending and pending[0][1].timestamp <= now:
            index, request = pending.popleft()
            waiting.append((index, _Sequence(request, request.prompt_tokens)))
        while waiting and len(running) < max_num_seqs:
            running.append(waiting.popleft())
        decodes = [s for _, s in running if s.prompt_left == 0]
        budget = profile.max_num_batched_tokens - len(decodes)
        chunks: list[tuple[_Sequence, int]] = []
        for _, s in running:
            if s.prompt_left and budget > 0:
                take = min(s.prompt_left, budget)
                chunks.append((s, take))
                budget -= take
        tokens = len(decodes) + sum(take for _, take in chunks)
        now += step_ms(args, profile, tokens=tokens, sequences=len(decodes) + len(chunks), skew=skew) / 1e3
        for s in decodes:
            s.token_times.append(now)
        for s, take in chunks:
            s.prompt_left -= take
            if not s.prompt_left:
                s.token_times.append(now)  # the prompt's last chunk gives the first token
        for index, s in [(i, s) for i, s in running if s.done]:
            outcomes[index] = _outcome(s)
        running = [(i, s) for i, s in running if not s.done]
    return outcomes


def _outcome(s: _Sequence) -> Outcome:
    arrived, first, last = s.request.timestamp, s.token_times[0], s.token_times[-1]
    n = len(s.token_times)
    return Outcome(arrived, first - arrived, (last - first) / (n - 1) if n > 1 else None, last - arrived, n)
