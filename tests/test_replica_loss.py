"""Streams survive the loss of their engine replica: the ingress goes on from the tokens it already sent,
on another replica or on the one Serve brings back, and the client sees one stream.

The replica's coordinator process is SIGKILLed (its workers die with it, as Ray's owned actors do), as
an out-of-memory kill or a lost node would end it.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import openai
import pytest
from ray import serve

from cluster.serve.app import GRPC_SERVICER, build_app
from cluster.serve.args import ServeArgs
from protos import moe_pb2_grpc
from tests.test_edge import grpc_request

APP = "survive"
TOKENS = 60
GREEDY_STREAMS, SEEDED_STREAMS = 8, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def titled(title: str) -> set[int]:
    """The processes whose title (Ray sets ray::<actor class>...) has `title` in it."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if title.encode() in cmdline:
                pids.add(int(entry.name))
    return pids


def replica_pids() -> set[int]:
    """The processes of this app's engine replicas (Ray titles them ray::ServeReplica:APP:EngineServer...)."""
    return titled(f"ServeReplica:{APP}:EngineServer")


def wait_for_replicas(count: int, *, timeout_s: float = 240) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        running = status.deployments["EngineServer"].replica_states.get("RUNNING", 0) if status else 0
        if running == count and len(replica_pids()) == count:
            return replica_pids()
        time.sleep(0.5)
    raise AssertionError(f"Serve did not have {count} running replicas within {timeout_s} s")


@dataclass
class Stream:
    """One client's stream as it arrived."""

    chunk_ids: set[str] = field(default_factory=set)
    text: str = ""
    chunks: int = 0
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: BaseException | None = None


def requests() -> list[dict[str, object]]:
    prompts = [f"Stream {i} of the experts:" for i in range(GREEDY_STREAMS + SEEDED_STREAMS)]
    sampling = [{"temperature": 0}] * GREEDY_STREAMS + [{"temperature": 1.0, "seed": 100 + i} for i in range(SEEDED_STREAMS)]
    return [{"prompt": p} | s for p, s in zip(prompts, sampling)]


def run_streams(port: int, *, kill_when_every_stream_has: int | None = None, victim: int | None = None) -> list[Stream]:
    """The streams at once; with a kill, SIGKILL `victim` once every stream has that many chunks."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    streams = [Stream() for _ in requests()]

    def one(stream: Stream, request: dict[str, object]) -> None:
        try:
            for chunk in client.completions.create(
                model="tiny",
                max_tokens=TOKENS,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
                **request,  # type: ignore[arg-type]
            ):
                stream.chunk_ids.add(chunk.id)
                if chunk.choices:
                    stream.text += chunk.choices[0].text
                    stream.chunks += 1
                    stream.finish_reason = chunk.choices[0].finish_reason or stream.finish_reason
                if chunk.usage is not None:
                    stream.completion_tokens = chunk.usage.completion_tokens
        except BaseException as e:  # reported below, with the stream it ended
            stream.error = e

    with ThreadPoolExecutor(len(streams)) as pool:
        done = [pool.submit(one, s, r) for s, r in zip(streams, requests())]
        if kill_when_every_stream_has is not None:
            assert victim is not None
            deadline = time.monotonic() + 300
            while not all(s.chunks >= kill_when_every_stream_has or s.error for s in streams):
                assert time.monotonic() < deadline, "the streams did not get going"
                time.sleep(0.01)
            assert all(s.chunks < TOKENS for s in streams), "the streams finished before the kill: nothing was shown"
            os.kill(victim, signal.SIGKILL)
        for f in done:
            f.result()
    return streams


def assert_same_as(streams: list[Stream], reference: list[Stream]) -> None:
    for i, (got, want) in enumerate(zip(streams, reference)):
        assert got.error is None, f"stream {i} failed: {got.error!r}"
        assert len(got.chunk_ids) == 1, f"stream {i} changed its id: {got.chunk_ids}"
        assert (got.finish_reason, got.completion_tokens) == ("length", TOKENS), f"stream {i}"
        assert got.text == want.text, f"stream {i} differs from the fault-free run"


@pytest.fixture(scope="module")
def checkpoint(make_ckpt) -> Path:  # type: ignore[no-untyped-def]
    return make_ckpt(tokenizer=True, vocab_size=32000)


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int


@contextmanager
def served(checkpoint: Path, replicas: int, **settings: object) -> Iterator[Ports]:
    """The app with `replicas` engine replicas (each one worker of all eight experts) on ports of its own."""
    ports = Ports(free_port(), free_port())
    serve.start(
        http_options={"host": "127.0.0.1", "port": ports.http},
        grpc_options={"port": ports.grpc, "grpc_servicer_functions": [GRPC_SERVICER]},
    )
    args = ServeArgs(
        checkpoint=str(checkpoint), served_model_name="tiny", experts_per_worker=8, min_replicas=replicas, **settings
    )
    serve.run(build_app(args), name=APP, route_prefix="/")
    try:
        wait_for_replicas(replicas)
        yield ports
    finally:
        serve.shutdown()


def test_streams_go_on_when_one_of_two_replicas_dies_twice(ray_session, checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    with served(checkpoint, 2) as ports:
        port = ports.http
        reference = run_streams(port)
        assert all(r.error is None and r.completion_tokens == TOKENS for r in reference)
        first, survivor = sorted(replica_pids())
        assert_same_as(run_streams(port, kill_when_every_stream_has=5, victim=first), reference)
        replaced = wait_for_replicas(2)
        assert survivor in replaced and first not in replaced
        assert_same_as(run_streams(port, kill_when_every_stream_has=5, victim=survivor), reference)


def unary_and_grpc(ports: Ports) -> tuple[str, list[int]]:
    """A non-streaming HTTP completion and a gRPC stream, both greedy, of TOKENS tokens each."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports.http}/v1", api_key="unused", max_retries=0, timeout=600)
    whole = client.completions.create(
        model="tiny", prompt="One answer, whole:", max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert (whole.choices[0].finish_reason, whole.usage.completion_tokens) == ("length", TOKENS)
    request = grpc_request([1, 5, 9], max_tokens=TOKENS, temperature=0.0)
    with grpc.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        chunks = list(moe_pb2_grpc.MoEServiceStub(channel).GenerateStream(request))
    assert chunks[-1].finish_reason == "length"
    return whole.choices[0].text, [t for c in chunks for t in c.token_ids]


def test_streams_go_on_on_the_replica_serve_brings_back_when_the_only_one_dies(ray_session, checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    with served(checkpoint, 1) as ports:
        port = ports.http
        reference = run_streams(port)
        reference_others = unary_and_grpc(ports)
        [only] = replica_pids()
        with ThreadPoolExecutor(1) as pool:
            others = pool.submit(unary_and_grpc, ports)  # in flight with the streams when the replica dies
            assert_same_as(run_streams(port, kill_when_every_stream_has=5, victim=only), reference)
            assert others.result() == reference_others  # non-streaming and gRPC requests are carried over too
        assert only not in wait_for_replicas(1)


def health(port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/health")
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    return response.status, body


def test_health_says_a_step_waits_on_a_stopped_worker_while_serve_keeps_the_replica(ray_session, checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    before = titled("ExpertWorker")
    with served(checkpoint, 1, stuck_step_s=1.0) as ports:
        port = ports.http
        deadline = time.monotonic() + 60  # workers of an earlier app may still be on their way out
        while len(titled("ExpertWorker") - before) != 1:
            assert time.monotonic() < deadline, f"expected this app's one worker, found {titled('ExpertWorker') - before}"
            time.sleep(0.2)
        [worker] = titled("ExpertWorker") - before
        [replica] = replica_pids()
        reference = run_streams(port)
        assert health(port)[0] == 200
        streams: list[Stream] = []
        running = threading.Thread(target=lambda: streams.extend(run_streams(port)))
        os.kill(worker, signal.SIGSTOP)  # the streams' first step waits on it
        try:
            running.start()
            deadline = time.monotonic() + 60
            while "waited" not in (answer := health(port))[1]:  # a ping's 503 may come first
                assert time.monotonic() < deadline, f"/health never said the step was stuck: {answer}"
                time.sleep(0.2)
            assert answer[0] == 503 and "on its expert workers" in answer[1], answer
            assert replica_pids() == {replica}  # Serve keeps the replica: its worker is to heal
        finally:
            os.kill(worker, signal.SIGCONT)
        running.join(timeout=300)
        assert_same_as(streams, reference)  # the stopped worker's calls were answered: nothing lost
        deadline = time.monotonic() + 30
        while health(port)[0] != 200:
            assert time.monotonic() < deadline, "/health did not recover"
            time.sleep(0.2)
