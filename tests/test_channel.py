"""The expert channel on its own: frames over a real socket to a real ChannelServer, hostile peers,
and the coordinator's ChannelTransport over real Ray actors that die, stop and come back, supervised
by cluster.supervisor."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from cluster.supervisor import WorkerSupervisor
from router.channel_transport import ChannelTransport
from router.transport import WorkerBatch
from router.wire import (
    HEADER,
    OK,
    SEGMENT,
    ChannelAddress,
    ChannelClosed,
    FrameLimits,
    RemoteError,
    Segment,
    recv_tensor,
    send_tensor,
    to_device,
    to_host,
)
from workers.channel_server import ChannelServer

LAYERS, D = 3, 64
POISON = 4
SECRET = b"s" * 32
LIMITS = FrameLimits(cols=D, tags=range(LAYERS + 5))  # tags past LAYERS reach forward, which raises


def fake_expert(layer: int, x: torch.Tensor, segments: tuple[Segment, ...] = ()) -> torch.Tensor:
    """A layer-dependent function that is exact in every dtype (a column rotation, doubled), so
    replies can be compared bit for bit: no arithmetic that rounds differently across CPUs."""
    if layer >= LAYERS:
        raise IndexError(f"this expert has {LAYERS} layers")
    return torch.roll(x, shifts=layer + 1, dims=1) * 2


# A worker answers on its compute thread (answers=its executor, shared by every connection); the
# channel alone answers on a thread per connection. Both must keep every promise below.
COMPUTE = ThreadPoolExecutor(1, thread_name_prefix="compute")


@pytest.fixture(params=[(True, None), (False, None), (True, COMPUTE)], ids=["unix", "tcp", "unix-on-compute-thread"])
def address(request: pytest.FixtureRequest) -> ChannelAddress:
    same_node, answers = request.param
    server = ChannelServer(fake_expert, secret=SECRET, limits=LIMITS, answers=answers)
    return server.open(same_node=same_node, node_ip="127.0.0.1")


@pytest.fixture
def sock(address: ChannelAddress) -> Iterator[socket.socket]:
    s = address.connect(SECRET, timeout_s=60)  # a hang fails the test instead of the suite
    yield s
    s.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_round_trip_carries_every_bit_and_the_request_id(sock: socket.socket, dtype: torch.dtype) -> None:
    x = torch.randn(5, D).to(dtype)
    send_tensor(sock, 2, x, request_id=77)
    tag, request_id, y, _ = recv_tensor(sock)
    assert (tag, request_id, y.dtype) == (OK, 77, dtype)
    assert torch.equal(y, fake_expert(2, x))


def test_a_failing_call_is_raised_with_its_message_and_the_worker_keeps_serving(sock: socket.socket) -> None:
    send_tensor(sock, 7, torch.randn(2, D), request_id=1)  # there is no layer 7
    with pytest.raises(RemoteError, match="layer 7: IndexError") as failed:
        recv_tensor(sock)
    assert failed.value.request_id == 1
    x = torch.randn(3, D)
    send_tensor(sock, 1, x, request_id=2)
    assert torch.equal(recv_tensor(sock)[2], fake_expert(1, x))


def test_requests_sent_before_replies_are_read_do_not_deadlock(sock: socket.socket) -> None:
    # Two micro-batches in flight: the second request goes out before the first reply is read.
    # Frames of 8 MiB are far larger than socket buffers, so a worker that stopped reading while
    # it sent its reply would block the sender forever.
    xs = [torch.randn(32768, D) for _ in range(2)]
    for layer, x in enumerate(xs):
        send_tensor(sock, layer, x, request_id=layer)
    for layer, x in enumerate(xs):
        assert torch.equal(recv_tensor(sock)[2], fake_expert(layer, x))


def test_every_connection_is_answered_on_the_one_compute_thread_in_order() -> None:
    threads: list[str] = []

    def recording_expert(layer: int, x: torch.Tensor, segments: tuple[Segment, ...] = ()) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        return fake_expert(layer, x)

    server = ChannelServer(recording_expert, secret=SECRET, limits=LIMITS, answers=COMPUTE)
    address = server.open(same_node=True, node_ip="127.0.0.1")
    peers = [address.connect(SECRET, timeout_s=60) for _ in range(2)]
    try:
        xs = [torch.randn(4, D) for _ in range(3)]
        for layer, x in enumerate(xs):  # each peer has all three in flight before reading
            for peer in peers:
                send_tensor(peer, layer, x, request_id=layer)
        for peer in peers:
            for layer, x in enumerate(xs):
                _, request_id, y, _ = recv_tensor(peer)
                assert request_id == layer and torch.equal(y, fake_expert(layer, x))
    finally:
        for peer in peers:
            peer.close()
    assert len(threads) == 6 and all(name.startswith("compute") for name in threads)


def test_a_cpu_tensor_is_staged_for_the_socket_without_a_copy() -> None:
    x = torch.randn(3, D)
    assert to_host(x) is x and to_device(x, torch.device("cpu")) is x


def test_a_closed_channel_drops_its_peers_and_takes_no_new_ones() -> None:
    server = ChannelServer(fake_expert, secret=SECRET, limits=LIMITS)
    address = server.open(same_node=True, node_ip="127.0.0.1")
    peer = address.connect(SECRET, timeout_s=30)
    send_tensor(peer, 1, torch.randn(2, D), request_id=1)
    recv_tensor(peer)  # served: its connection is open
    server.close()
    assert closed(peer)
    with pytest.raises(OSError):
        address.connect(SECRET, timeout_s=5)


def raw_connection(address: ChannelAddress) -> socket.socket:
    if address.path:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(address.path)
    else:
        s = socket.create_connection((address.host, address.port))
    s.settimeout(30)
    return s


def closed(s: socket.socket) -> bool:
    try:
        while chunk := s.recv(1 << 16):
            del chunk
        return True
    except (ConnectionResetError, ChannelClosed):
        return True


def test_a_peer_without_the_secret_is_refused_and_the_worker_lives(address: ChannelAddress) -> None:
    intruder = raw_connection(address)
    assert len(intruder.recv(32)) == 32  # the challenge
    intruder.sendall(b"\0" * 32)  # a wrong answer
    try:
        intruder.sendall(HEADER.pack(0, 1, D, 0, 1, 0) + bytes(4 * D))  # and a frame anyway
    except (BrokenPipeError, ConnectionResetError):
        pass  # the worker already hung up on the wrong answer: refused either way
    assert closed(intruder)
    assert closed(address.connect(b"x" * 32, timeout_s=30))  # another secret: refused too
    good = address.connect(SECRET, timeout_s=30)
    x = torch.randn(2, D)
    send_tensor(good, 0, x, request_id=5)
    assert torch.equal(recv_tensor(good)[2], fake_expert(0, x))


@pytest.mark.parametrize(
    "header",
    [
        HEADER.pack(0, 1, D, 99, 1, 0),  # unknown dtype code
        HEADER.pack(0, 1, D + 1, 0, 1, 0),  # not the hidden size
        HEADER.pack(0, 1 << 30, D, 0, 1, 0),  # 256 GiB of float32: must not be allocated
        HEADER.pack(0, -5, D, 0, 1, 0),  # negative rows
        HEADER.pack(1000, 1, D, 0, 1, 0),  # no such layer
        HEADER.pack(-1, 1 << 30, 0, 0, 1, 0),  # an error frame of a GiB of text
        HEADER.pack(-1, 5, 0, 0, 1, 0) + b"hello",  # an error frame at all: only workers send those
    ],
    ids=["dtype", "cols", "huge", "negative", "layer", "error-frame", "small-error-frame"],
)
def test_a_malformed_header_drops_the_peer_not_the_worker(address: ChannelAddress, header: bytes) -> None:
    bad = address.connect(SECRET, timeout_s=30)
    start = time.monotonic()
    bad.sendall(header)
    assert closed(bad) and time.monotonic() - start < 10
    good = address.connect(SECRET, timeout_s=30)
    x = torch.randn(2, D)
    send_tensor(good, 1, x, request_id=9)
    assert torch.equal(recv_tensor(good)[2], fake_expert(1, x))


def batch(x: torch.Tensor) -> WorkerBatch:
    return WorkerBatch(x, ())


SEGMENTED = FrameLimits(cols=D, tags=range(LAYERS), experts=range(2))


def per_expert(layer: int, x: torch.Tensor, segments: tuple[Segment, ...]) -> torch.Tensor:
    """Expert e's rows times e + 1: the reply shows which expert each row was given to."""
    out, row = [], 0
    for expert, rows in segments:
        out.append(x[row : row + rows] * (expert + 1))
        row += rows
    return torch.cat(out)


@pytest.fixture
def segmented() -> ChannelAddress:
    return ChannelServer(per_expert, secret=SECRET, limits=SEGMENTED).open(same_node=True, node_ip="127.0.0.1")


def test_segments_tell_a_worker_of_several_experts_whose_rows_are_whose(segmented: ChannelAddress) -> None:
    sock = segmented.connect(SECRET, timeout_s=60)
    x = torch.randn(5, D)
    send_tensor(sock, 0, x, request_id=3, segments=[Segment(1, 2), Segment(0, 3)])
    reply = recv_tensor(sock)
    assert (reply.request_id, reply.segments) == (3, ())
    assert torch.equal(reply.x, torch.cat([x[:2] * 2, x[2:]]))


@pytest.mark.parametrize(
    "segments",
    [[(0, 1)], [(0, 3)], [(2, 2)], [(0, -1), (1, 3)], [(0, 1), (1, 1), (0, 0)], []],
    ids=["short", "long", "no-such-expert", "negative", "too-many", "none"],
)
def test_segments_that_do_not_cover_the_rows_drop_the_peer_not_the_worker(
    segmented: ChannelAddress, segments: list[tuple[int, int]]
) -> None:
    bad = segmented.connect(SECRET, timeout_s=30)
    header = HEADER.pack(0, 2, D, 0, 1, len(segments)) + b"".join(SEGMENT.pack(*s) for s in segments)
    bad.sendall(header + bytes(4 * 2 * D))
    assert closed(bad)
    good = segmented.connect(SECRET, timeout_s=30)
    x = torch.randn(2, D)
    send_tensor(good, 1, x, request_id=9, segments=[Segment(0, 2)])
    assert torch.equal(recv_tensor(good).x, x)


class LocalLink:
    """A WorkerLink to channels in this process: the socket transport without Ray."""

    def __init__(self, servers: list[ChannelServer]) -> None:
        self.servers = servers
        self.connections = 0
        self.restarted: list[int] = []

    def connect_all(self) -> list[socket.socket]:
        return [self.connect(w) for w in range(len(self.servers))]

    def connect(self, worker: int) -> socket.socket:
        self.connections += 1
        return self.servers[worker].open(same_node=True, node_ip="127.0.0.1").connect(SECRET, timeout_s=30)

    def restart(self, worker: int) -> None:
        self.restarted.append(worker)


def test_a_broken_connection_is_made_again_through_the_link_and_its_call_sent_again() -> None:
    link = LocalLink([ChannelServer(fake_expert, secret=SECRET, limits=LIMITS)])
    transport = ChannelTransport(link)
    x = torch.randn(4, D)
    pending = transport.submit(1, {0: batch(x)})
    transport.sockets[0].shutdown(socket.SHUT_RDWR)  # the connection breaks with the call in flight
    assert torch.equal(transport.gather(pending)[0], fake_expert(1, x))
    assert transport.replacements == 1 and link.connections == 2
    assert link.restarted == []  # a worker that went away is not killed again: only a stuck one is
    transport.close()


def slow_expert(layer: int, x: torch.Tensor, segments: tuple[Segment, ...] = ()) -> torch.Tensor:
    time.sleep(0.5)  # long enough that a kill right after sending lands mid-call
    return fake_expert(layer, x)


@ray.remote(num_cpus=0.01, max_restarts=-1, max_task_retries=-1)  # as cluster.placement starts workers
class FakeWorker:
    """An expert worker reduced to its channel: what ChannelTransport and WorkerSupervisor talk to."""

    def __init__(self, layers: int = LAYERS) -> None:
        self.layers = layers
        self.server = ChannelServer(self.forward, secret=SECRET, limits=LIMITS)
        self.held: list[int] = [0]  # as constructed: what Ray restarts it with

    def hold_only(self, experts: list[int]) -> list[int]:
        self.held = list(experts)
        return self.held

    def holding(self) -> list[int]:
        return self.held

    def forward(self, layer: int, x: torch.Tensor, segments: tuple[Segment, ...] = ()) -> torch.Tensor:
        if layer == POISON:
            os._exit(1)  # a request that kills its worker every time (as an out-of-memory kill would)
        if layer >= self.layers:
            raise IndexError(f"this worker has {self.layers} layers")
        return slow_expert(layer, x)

    def open_channel(self, coordinator_node: str) -> ChannelAddress:
        return self.server.open(same_node=True, node_ip="127.0.0.1")

    def pid(self) -> int:
        return os.getpid()


def test_a_worker_lost_with_two_layers_in_flight_answers_both(ray_session) -> None:  # type: ignore[no-untyped-def]
    worker = FakeWorker.remote()
    supervisor = WorkerSupervisor([worker], coordinator_node="", secret=SECRET)
    transport = ChannelTransport(supervisor)
    supervisor.set_holdings([[3, 5]])  # a rebalance gave it other experts than it was started with
    first_pid = ray.get(worker.pid.remote())
    xs = [torch.randn(4, D) for _ in range(2)]
    pending = [transport.submit(layer, {0: batch(x)}) for layer, x in enumerate(xs)]  # two micro-batches
    ray.kill(worker, no_restart=False)
    for layer, (p, x) in enumerate(zip(pending, xs)):
        assert torch.equal(transport.gather(p)[0], fake_expert(layer, x))
    assert ray.get(worker.pid.remote()) != first_pid  # it was restarted and answered both again
    assert ray.get(worker.holding.remote()) == [3, 5]  # and was given the current map's experts first
    transport.close()
    ray.kill(worker)


def test_a_failed_layer_leaves_no_stale_reply_behind(ray_session) -> None:  # type: ignore[no-untyped-def]
    workers = [FakeWorker.remote(layers=2), FakeWorker.remote()]
    transport = ChannelTransport(WorkerSupervisor(workers, coordinator_node="", secret=SECRET))
    x = torch.randn(3, D)
    with pytest.raises(RemoteError, match="layer 2: IndexError"):
        transport.gather(transport.submit(2, {0: batch(x), 1: batch(x)}))  # worker 0 has no layer 2; worker 1 answers
    # A step that fails between submit and gather: its replies are never read...
    transport.submit(0, {0: batch(x), 1: batch(x)})
    # ...and the next step gets its own replies, not those.
    out = transport.gather(transport.submit(1, {0: batch(x), 1: batch(x)}))
    assert torch.equal(out[0], fake_expert(1, x)) and torch.equal(out[1], fake_expert(1, x))
    transport.close()
    for w in workers:
        ray.kill(w)


def test_a_stopped_worker_is_killed_and_replaced_and_its_call_answered(ray_session) -> None:  # type: ignore[no-untyped-def]
    worker = FakeWorker.remote()
    transport = ChannelTransport(WorkerSupervisor([worker], coordinator_node="", secret=SECRET, timeout_s=3))
    stopped_pid = ray.get(worker.pid.remote())
    os.kill(stopped_pid, signal.SIGSTOP)  # alive, holding the socket, answering nothing
    x = torch.randn(4, D)
    start = time.monotonic()
    try:
        out = transport.gather(transport.submit(1, {0: batch(x)}))
    finally:
        with contextlib.suppress(ProcessLookupError):  # it was killed, as it should be
            os.kill(stopped_pid, signal.SIGCONT)
    assert torch.equal(out[0], fake_expert(1, x))
    assert transport.replacements == 1 and ray.get(worker.pid.remote()) != stopped_pid
    assert time.monotonic() - start < 60
    transport.close()
    ray.kill(worker)


def test_a_request_that_kills_its_worker_fails_its_step_and_not_the_next(ray_session) -> None:  # type: ignore[no-untyped-def]
    worker = FakeWorker.remote()
    transport = ChannelTransport(WorkerSupervisor([worker], coordinator_node="", secret=SECRET), max_replacements=1)
    x = torch.randn(2, D)
    with pytest.raises(ConnectionError):
        transport.gather(transport.submit(POISON, {0: batch(x)}))
    transport.abandon()  # as the coordinator does when a step fails
    assert torch.equal(transport.gather(transport.submit(1, {0: batch(x)}))[0], fake_expert(1, x))  # not sent the poison again
    transport.close()
    ray.kill(worker)
