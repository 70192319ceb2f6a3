"""A soak of the served app: mixed requests from a pool of clients while its processes are killed.

    request mix ─► pool of client threads ─HTTP─► Serve proxy ─► ingress ─► engine replicas ─► expert workers
                                                                              ▲                    ▲
    faults, spread over the run's progress: ─── SIGKILL a coordinator ────────┘   SIGKILL a worker ┘

Each request is one of four kinds, and each kind has the endings it allows:

    good      greedy, ignore_eos, fixed max_tokens: the text of its solo, fault-free run
    deadline  the same with X-Request-Timeout: that text, or a 504 (a stream: its text so far, then a
              timeout error event)
    cancel    a stream the client closes after a few chunks: no error before it closes
    hostile   a body or header the API refuses: a 4xx, and nothing else disturbed

A request that ends otherwise is lost. tests/test_soak.py runs a short soak in the test session's Ray;
`python -m tests.soak --requests 5000 --minutes 20` runs a long one in a Ray of its own, on 127.0.0.1,
prints its figures, and exits with 1 if a request was lost or a replica's memory moved more than 10%.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ray import serve

from cluster.serve.app import build_app
from cluster.serve.args import ServeArgs

APP = "soak"
MODEL = "tiny"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPTS = 6  # distinct prompts per endpoint: the fault-free pass runs each once per max_tokens
MAX_TOKENS = (4, 8, 16)
DEADLINES_S = (0.02, 0.3, 2.0, 30.0)  # the shortest always ends in a 504, the longest never
CANCEL_AFTER_CHUNKS = 2
CLIENT_TIMEOUT_S = 180.0  # a socket's; above the ingress's wait for a replacement replica (replica_wait_s)
MEMORY_TOLERANCE = 0.10

Kind = Literal["good", "deadline", "cancel", "hostile"]
KINDS: tuple[Kind, ...] = ("good", "deadline", "cancel", "hostile")
Key = tuple[str, int, int]  # (path, prompt index, max_tokens): what a good or deadline request's text depends on


def prompt_fields(path: str, prompt: int) -> dict[str, Any]:
    if path == COMPLETIONS:
        return {"prompt": f"Soak prompt {prompt}: the experts of layer {prompt % 2} say"}
    return {"messages": [{"role": "user", "content": f"Question {prompt}: which expert answers?"}]}


def greedy_body(key: Key, *, stream: bool) -> bytes:
    path, prompt, max_tokens = key
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    return json.dumps(body | prompt_fields(path, prompt)).encode()


def _completion(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 4} | fields).encode()


def _chat(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4} | fields).encode()


# (path, body, headers): every one refused before it reaches an engine.
HOSTILE: dict[str, tuple[str, bytes, dict[str, str]]] = {
    "malformed JSON": (COMPLETIONS, b'{"model": "tiny", "prompt": ', {}),
    "not an object": (COMPLETIONS, b"[1, 2]", {}),
    "max_tokens of wrong type": (COMPLETIONS, _completion(max_tokens="many"), {}),
    "prompt of wrong type": (COMPLETIONS, _completion(prompt={"text": "hi"}), {}),
    "huge max_tokens": (COMPLETIONS, _completion(max_tokens=10**9), {}),
    "negative max_tokens": (COMPLETIONS, _completion(max_tokens=-3), {}),
    "negative temperature": (COMPLETIONS, _completion(temperature=-0.5), {}),
    "top_p above one": (COMPLETIONS, _completion(top_p=1.5), {}),
    "NaN temperature": (COMPLETIONS, _completion().replace(b'"max_tokens": 4', b'"max_tokens": 4, "temperature": NaN'), {}),
    "token id outside the vocabulary": (COMPLETIONS, _completion(prompt=[1, 10**6]), {}),
    "unknown model": (COMPLETIONS, _completion(model="gpt-4"), {}),
    "empty messages": (CHAT, _chat(messages=[]), {}),
    "messages of wrong type": (CHAT, _chat(messages="hi"), {}),
    "chat max_tokens above context": (CHAT, _chat(max_tokens=10**6), {}),
    "deadline that is not a number": (COMPLETIONS, _completion(), {"X-Request-Timeout": "soon"}),
}


@dataclass(frozen=True)
class Request:
    index: int
    kind: Kind
    path: str
    body: bytes
    stream: bool
    key: Key | None = None  # good and deadline requests: which fault-free text they must give
    headers: dict[str, str] = field(default_factory=dict)


def request_mix(n: int, *, seed: int = 0) -> list[Request]:
    """`n` requests, drawn with `seed`: about 55% good, 15% with a deadline, 15% cancelled, 15% hostile."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choices(KINDS, weights=[55, 15, 15, 15])[0]
        if kind == "hostile":
            path, body, headers = HOSTILE[rng.choice(sorted(HOSTILE))]
            out.append(Request(i, kind, path, body, stream=rng.random() < 0.5, headers=headers))
            continue
        path = rng.choice([COMPLETIONS, CHAT])
        key = (path, rng.randrange(PROMPTS), MAX_TOKENS[-1] if kind != "good" else rng.choice(MAX_TOKENS))
        stream = kind == "cancel" or rng.random() < 0.5
        headers = {"X-Request-Timeout": str(rng.choice(DEADLINES_S))} if kind == "deadline" else {}
        out.append(Request(i, kind, path, greedy_body(key, stream=stream), stream, key, headers))
    return out


@dataclass(frozen=True)
class Outcome:
    """How one request ended, as its client saw it."""

    status: int  # HTTP status; 0: no response (a connection error)
    text: str = ""  # the answer's text (a stream: joined until it ended or was closed)
    error: str | None = None  # the error body's type (a stream's error event included), or the exception
    closed_early: bool = False  # the client closed the stream
    latency_s: float = 0.0


def send(port: int, request: Request) -> Outcome:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
    try:
        conn.request("POST", request.path, body=request.body, headers={"Content-Type": "application/json"} | request.headers)
        response = conn.getresponse()
        if response.status != 200 or not request.stream:
            payload = json.loads(response.read() or b"{}")
            outcome = Outcome(response.status, answer_text(payload), (payload.get("error") or {}).get("type"))
        else:
            outcome = read_stream(response, close_after=CANCEL_AFTER_CHUNKS if request.kind == "cancel" else None)
            if outcome.closed_early:
                conn.sock.shutdown(socket.SHUT_RDWR)  # the client leaves; the engine must abort the request
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        outcome = Outcome(0, error=repr(e))
    finally:
        conn.close()
    return Outcome(outcome.status, outcome.text, outcome.error, outcome.closed_early, time.monotonic() - start)


def answer_text(payload: dict[str, Any]) -> str:
    """A completion's or chat completion's text, or a chunk's; "" for a body without one."""
    choices = payload.get("choices") or [{}]
    choice = choices[0]
    if "text" in choice:
        return str(choice["text"])
    return str((choice.get("message") or choice.get("delta") or {}).get("content") or "")


def read_stream(response: http.client.HTTPResponse, *, close_after: int | None) -> Outcome:
    """The SSE stream's text up to [DONE], an error event, or `close_after` chunks with text."""
    text, chunks = "", 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return Outcome(200, text)
        event = json.loads(line[6:])
        if "error" in event:
            return Outcome(200, text, event["error"].get("type"))
        piece = answer_text(event)
        text += piece
        chunks += bool(piece)
        if close_after is not None and chunks >= close_after:
            return Outcome(200, text, closed_early=True)
    return Outcome(200, text, "stream ended without [DONE]")


def verdict(request: Request, outcome: Outcome, expected: dict[Key, str]) -> str:
    """The ending's name when the request's kind allows it ("completed", "timed out", "cancelled",
    "refused"), else "lost: why"."""
    want = expected.get(request.key) if request.key else None
    if request.kind == "hostile":
        return "refused" if 400 <= outcome.status < 500 else f"lost: {outcome.status} {outcome.error}"
    if request.kind == "cancel":
        ok = outcome.status == 200 and outcome.error is None
        return "cancelled" if ok else f"lost: {outcome.status} {outcome.error}"
    if outcome.status == 200 and outcome.error is None:
        return "completed" if outcome.text == want else f"lost: text {outcome.text!r}, not {want!r}"
    if request.kind == "deadline":
        timed_out = outcome.status == 504 or (outcome.status == 200 and outcome.error == "timeout")
        if timed_out and want is not None and want.startswith(outcome.text):
            return "timed out"
    return f"lost: {outcome.status} {outcome.error} after {outcome.text!r}"


# Faults


def app_replica_pids() -> set[int]:
    """The processes of this app's engine replicas (Ray titles them ray::ServeReplica:APP:EngineServer...)."""
    return {pid for pid, cmdline in processes() if f"ServeReplica:{APP}:EngineServer".encode() in cmdline}


def app_worker_pids() -> set[int]:
    """The expert worker processes beside this app's replicas: children of the raylet that runs the
    replicas, so never another Ray's on the same machine."""
    raylets = {parent_pid(pid) for pid in app_replica_pids()}
    return {pid for pid, cmdline in processes() if b"ray::ExpertWorker" in cmdline and parent_pid(pid) in raylets}


def processes() -> Iterator[tuple[int, bytes]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes()
            except OSError:
                continue


def parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@dataclass(frozen=True)
class FaultPlan:
    """Faults spread evenly over the run's progress (the larger of requests done and time spent)."""

    worker_kills: int
    replica_kills: int

    def schedule(self) -> list[tuple[float, str]]:
        """(progress from 0 to 1, "worker" or "replica"), in order; none in the first tenth (the
        clients are getting going) nor in the last fifth (so that the run ends with every replica back)."""

        def spread(n: int, kind: str) -> list[tuple[float, str]]:
            return [(0.1 + 0.7 * (i + 0.5) / n, kind) for i in range(n)]

        return sorted(spread(self.worker_kills, "worker") + spread(self.replica_kills, "replica"))


def inject(kind: str, rng: random.Random, *, replicas: int) -> int | None:
    """SIGKILL one of the app's expert workers or, when all `replicas` run, one replica's coordinator
    (its workers die with it, as Ray's owned actors do); the pid, or None when none could be."""
    if kind == "replica":
        pids = sorted(app_replica_pids())
        if len(pids) < replicas:
            return None  # one is being replaced: wait for it rather than leave no replica
    else:
        pids = sorted(app_worker_pids())
    if not pids:
        return None
    victim = rng.choice(pids)
    os.kill(victim, signal.SIGKILL)
    return victim


# The run


@dataclass
class Report:
    requests: list[Request]
    outcomes: list[Outcome]
    verdicts: list[str]
    faults: list[tuple[str, int]]  # (kind, pid) in the order injected
    faults_planned: int
    wall_s: float
    memory_before: dict[str, int] = field(default_factory=dict)  # replica id -> resident bytes
    memory_after: dict[str, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # seconds each step of soak() took

    def by_outcome(self) -> Counter[str]:
        return Counter(v if not v.startswith("lost") else "lost" for v in self.verdicts)

    def lost(self) -> list[str]:
        return [
            f"request {r.index} ({r.kind}, {r.path}): {v}" for r, v in zip(self.requests, self.verdicts) if v.startswith("lost")
        ]

    def latencies(self) -> list[float]:
        return sorted(o.latency_s for o, v in zip(self.outcomes, self.verdicts) if v == "completed")


def run_requests(
    port: int, requests: list[Request], expected: dict[Key, str], *, clients: int, faults: FaultPlan, minutes: float | None = None
) -> Report:
    """The requests, in order, through `clients` client threads (each sends its next once its last has
    ended), the plan's faults injected as the run progresses; with `minutes`, no request is sent after."""
    rng = random.Random(1)
    schedule = faults.schedule()
    injected: list[tuple[str, int]] = []
    outcomes: dict[int, Outcome] = {}  # by position in `requests`
    pending, taking, stop = iter(enumerate(requests)), threading.Lock(), threading.Event()

    def client() -> None:
        while not stop.is_set():
            with taking:
                i, request = next(pending, (-1, None))
            if request is None:
                return
            try:
                outcomes[i] = send(port, request)
            except Exception as e:  # an answer send could not read: an ending like any other, and counted
                outcomes[i] = Outcome(0, error=repr(e))

    threads = [threading.Thread(target=client, name=f"soak-client-{c}") for c in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        spent = (time.monotonic() - start) / (60 * minutes) if minutes else 0.0
        if schedule and max(len(outcomes) / len(requests), spent) >= schedule[0][0]:
            pid = inject(schedule[0][1], rng, replicas=2)
            if pid is not None:
                injected.append((schedule.pop(0)[1], pid))
        if spent >= 1:
            stop.set()  # the time is up: the clients finish the requests they sent, and send no more
        time.sleep(0.05)
    sent = [(r, outcomes[i]) for i, r in enumerate(requests) if i in outcomes]
    verdicts = [verdict(r, o, expected) for r, o in sent]
    return Report(
        [r for r, _ in sent], [o for _, o in sent], verdicts, injected, len(faults.schedule()), time.monotonic() - start
    )


def all_keys() -> list[Key]:
    return [(path, prompt, n) for path in (COMPLETIONS, CHAT) for prompt in range(PROMPTS) for n in MAX_TOKENS]


def expected_texts(port: int, keys: list[Key]) -> dict[Key, str]:
    """Each key's text from a solo, fault-free, non-streaming request."""
    expected = {}
    for key in keys:
        outcome = send(port, Request(-1, "good", key[0], greedy_body(key, stream=False), stream=False, key=key))
        assert outcome.status == 200 and outcome.error is None, f"the fault-free run of {key} failed: {outcome}"
        expected[key] = outcome.text
    return expected


# The app and its stats


def get_json(port: int, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (path, response.status, body)
        return dict(json.loads(body))
    finally:
        conn.close()


def resident_memory(stats: dict[str, Any]) -> dict[str, int]:
    return {r["replica"]: int(r["resident_bytes"]) for r in stats["replicas"] if r["serving"]}


def is_quiet(stats: dict[str, Any], replicas: int) -> bool:
    """`replicas` serving, none with a sequence running or waiting or a KV block held."""
    used_blocks = stats["kv_blocks"] - stats["kv_blocks_free"]
    return stats["num_replicas"] == replicas and stats["running"] == stats["waiting"] == used_blocks == 0


def wait_until(what: str, check: Callable[[], bool], *, timeout_s: float, every_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        time.sleep(every_s)


def running_replicas() -> int:
    status = serve.status().applications.get(APP)
    return status.deployments["EngineServer"].replica_states.get("RUNNING", 0) if status else 0


def wait_quiet(port: int, replicas: int, *, timeout_s: float) -> dict[str, Any]:
    """The stats once Serve runs `replicas` and the engines are quiet (a killed replica's last snapshot
    stops counting once it is stale: cluster.serve.replica_registry.STALE_S)."""
    stats: dict[str, Any] = {}

    def quiet() -> bool:
        nonlocal stats
        stats = get_json(port, "/v1/engine/stats")
        return running_replicas() == replicas and is_quiet(stats, replicas)

    try:
        wait_until("the engines to be quiet", quiet, timeout_s=timeout_s)
    except AssertionError:
        raise AssertionError(f"not quiet within {timeout_s:g} s: {quiet_figures(stats)}") from None
    return stats


def quiet_figures(stats: dict[str, Any]) -> dict[str, Any]:
    keys = ("num_replicas", "running", "waiting", "kv_blocks", "kv_blocks_free")
    return {k: stats.get(k) for k in keys} | {
        "replicas": [{k: r.get(k) for k in ("replica", "serving", *keys[1:])} for r in stats.get("replicas", [])]
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_args(checkpoint: Path, *, clients: int) -> ServeArgs:
    """Two replicas of one worker each (all eight experts), sized so that no request waits for room:
    every client's request fits in one replica's running sequences, with the other replica gone."""
    return ServeArgs.model_validate(
        {
            "checkpoint": str(checkpoint),
            "served_model_name": MODEL,
            "experts_per_worker": 8,
            "min_replicas": 2,
            "max_num_seqs": clients,
            "max_waiting": 4 * clients,  # aborted sequences may linger a step beside their clients' next requests
        }
    )


@contextmanager
def served(args: ServeArgs) -> Iterator[int]:
    """The app on 127.0.0.1 (a port of its own), up with all its replicas; Serve shut down after."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name=APP, route_prefix="/")
        wait_until("the replicas to run", lambda: running_replicas() == args.min_replicas, timeout_s=240, every_s=0.5)
        yield port
    finally:
        serve.shutdown()


def soak(
    port: int, requests: list[Request], *, clients: int, faults: FaultPlan, warm_up: int, minutes: float | None = None
) -> Report:
    """The fault-free texts; a fault-free warm-up of `warm_up` requests (a replica's memory grows with
    the load it first meets, then levels off), memory; `requests` with faults; quiet, with every
    replica back; the warm-up again (so that a replacement has met the load a fresh replica had when
    it was measured), memory. Raises AssertionError if a fault-free pass loses a request, or if the
    system is not quiet within four minutes after the faults."""
    phases, start = {}, time.monotonic()

    def phase(name: str) -> None:
        nonlocal start
        phases[name], start = time.monotonic() - start, time.monotonic()

    def fault_free_pass() -> None:
        done = run_requests(port, request_mix(warm_up, seed=99), expected, clients=clients, faults=FaultPlan(0, 0))
        assert not done.lost(), "requests lost without faults:\n" + "\n".join(done.lost())

    expected = expected_texts(port, all_keys())
    phase("fault-free texts")
    fault_free_pass()
    before = resident_memory(wait_quiet(port, 2, timeout_s=60))
    phase("warm-up")
    report = run_requests(port, requests, expected, clients=clients, faults=faults, minutes=minutes)
    phase("soak")
    wait_quiet(port, 2, timeout_s=240)  # a replacement serves, and has published: the router knows it by now
    phase("quiet")
    fault_free_pass()
    report.memory_before = before
    report.memory_after = resident_memory(wait_quiet(port, 2, timeout_s=60))
    phase("warm-up again")
    report.phases = phases
    return report


def memory_problems(report: Report) -> list[str]:
    """Each replica's resident memory against its own before the soak, a replacement's against a fresh one's."""
    fresh = statistics.mean(report.memory_before.values())
    problems = []
    for replica, after in report.memory_after.items():
        before = report.memory_before.get(replica, fresh)
        if abs(after - before) > MEMORY_TOLERANCE * before:
            whose = "its own" if replica in report.memory_before else "a fresh replica's"
            problems.append(f"replica {replica}: {mib(after)} resident, {mib(before)} was {whose}")
    return problems


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def summary(report: Report) -> str:
    latencies = report.latencies()
    p50 = latencies[len(latencies) // 2] if latencies else float("nan")
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    kinds = Counter(r.kind for r in report.requests)
    faults = Counter(kind for kind, _ in report.faults)
    lines = [
        f"{len(report.requests)} requests in {report.wall_s:.0f} s: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
        "by outcome: " + ", ".join(f"{n} {k}" for k, n in sorted(report.by_outcome().items())),
        f"faults injected: {faults['worker']} expert workers, {faults['replica']} replicas (of {report.faults_planned} planned)",
        f"lost: {len(report.lost())}",
        f"latency of completed requests: p50 {p50:.2f} s, p99 {p99:.2f} s",
        "steps: " + ", ".join(f"{name} {s:.0f} s" for name, s in report.phases.items()),
    ]
    replicas = sorted(set(report.memory_before) | set(report.memory_after))
    for replica in replicas:
        before, after = report.memory_before.get(replica), report.memory_after.get(replica)
        lines.append(
            f"replica {replica}: resident {mib(before) if before else '-'} before, {mib(after) if after else '- (killed)'} after"
        )
    return "\n".join(lines + report.lost()[:20])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000, help="requests at most")
    parser.add_argument("--minutes", type=float, default=20.0, help="minutes at most; the soak ends at the first limit")
    parser.add_argument("--clients", type=int, default=16, help="client threads")
    parser.add_argument("--worker-kill-every-s", type=float, default=20.0, help="an expert worker killed this often")
    parser.add_argument("--replica-kill-every-s", type=float, default=120.0, help="a replica's coordinator killed this often")
    parser.add_argument("--warm-up", type=int, default=300, help="fault-free requests before memory is measured")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()

    import ray

    from mixtral.synthetic import make_checkpoint
    from tests.conftest import SMALL

    seconds = 60 * options.minutes
    faults = FaultPlan(round(seconds / options.worker_kill_every_s), max(1, round(seconds / options.replica_kill_every_s)))
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            overrides = SMALL | {"vocab_size": 32000}
            checkpoint = make_checkpoint(Path(tmp) / "model", preset_name="tiny", overrides=overrides, tokenizer=True)
            with served(serve_args(checkpoint, clients=options.clients)) as port:
                requests = request_mix(options.requests, seed=options.seed)
                report = soak(
                    port, requests, clients=options.clients, faults=faults, warm_up=options.warm_up, minutes=options.minutes
                )
    finally:
        ray.shutdown()
    problems = memory_problems(report)
    print(summary(report))
    print("\n".join(problems) or f"resident memory within {MEMORY_TOLERANCE:.0%} of before")
    raise SystemExit(1 if report.lost() or problems else 0)


if __name__ == "__main__":
    main()
