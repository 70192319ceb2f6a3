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
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from cluster.supervisor import WorkerSupervisor
from router.channel_transport import ChannelTransport
from router.transport import WorkerBatch
from router.wire import (
    HEADER,
    NONCE_BYTES,
    OK,
    SEGMENT,
    BadFrame,
    ChannelAddress,
    ChannelClosed,
    FrameLimits,
    RemoteError,
    Segment,
    challenge,
    recv_tensor,
    send_tensor,
    to_device,
    to_host,
)
from workers.channel_server import MAX_PENDING_HANDSHAKES, ChannelServer

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
    with pytest.raises(BadFrame, match="secret"):  # another secret: refused too
        address.connect(b"x" * 32, timeout_s=30)
    good = address.connect(SECRET, timeout_s=30)
    x = torch.randn(2, D)
    send_tensor(good, 0, x, request_id=5)
    assert torch.equal(recv_tensor(good)[2], fake_expert(0, x))


def eventually(condition: Callable[[], bool], *, within_s: float = 5) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def served(address: ChannelAddress, *, within_s: float) -> bool:
    """Whether a coordinator with the secret connects (trying again while it is turned away) and is answered."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            peer = address.connect(SECRET, timeout_s=10)
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
    x = torch.randn(2, D)
    send_tensor(peer, 1, x, request_id=1)
    ok = torch.equal(recv_tensor(peer).x, fake_expert(1, x))
    peer.close()
    return ok


def test_idle_peers_past_the_cap_are_closed_at_once_and_a_coordinator_is_served() -> None:
    server = ChannelServer(fake_expert, secret=SECRET, limits=LIMITS, handshake_timeout_s=2.0)
    address = server.open(same_node=True, node_ip="127.0.0.1")
    idle = [raw_connection(address) for _ in range(MAX_PENDING_HANDSHAKES + 8)]  # none ever answers
    first = [s.recv(NONCE_BYTES) for s in idle]  # a challenge, or b"": hung up on at once
    assert sum(len(b) == NONCE_BYTES for b in first) <= MAX_PENDING_HANDSHAKES
    assert sum(b == b"" for b in first) >= 8
    start = time.monotonic()
    assert served(address, within_s=10)
    for s in idle:  # the challenged ones are dropped at the handshake's time limit
        assert closed(s)
    assert time.monotonic() - start < 10


def test_a_handshake_that_trickles_in_is_cut_off_at_its_time_limit() -> None:
    server = ChannelServer(fake_expert, secret=SECRET, limits=LIMITS, handshake_timeout_s=1.0)
    address = server.open(same_node=True, node_ip="127.0.0.1")
    slow = raw_connection(address)
    assert len(slow.recv(NONCE_BYTES)) == NONCE_BYTES
    start = time.monotonic()
    with contextlib.suppress(OSError):  # a byte at a time, each well within the time limit
        for _ in range(2 * NONCE_BYTES):
            slow.sendall(b"\0")
            time.sleep(0.25)
    assert closed(slow) and time.monotonic() - start < 3
    assert served(address, within_s=10)


class FailsToSetUpOnce(ChannelServer):
    """A channel whose set-up of its first connection raises (as a thread that cannot be started would)."""

    failed = False

    def _set_up(self, conn: socket.socket) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("can't start new thread")
        super()._set_up(conn)


@pytest.mark.parametrize("same_node", [True, False], ids=["unix", "tcp"])
def test_a_connection_that_fails_to_be_set_up_does_not_stop_the_next(same_node: bool) -> None:
    address = FailsToSetUpOnce(fake_expert, secret=SECRET, limits=LIMITS).open(same_node=same_node, node_ip="127.0.0.1")
    assert closed(raw_connection(address))  # dropped, not left open
    assert served(address, within_s=10)


def impostor(script: Callable[[socket.socket], None]) -> ChannelAddress:
    """A worker's address served by `script` on each connection: a peer that speaks the wire its own way."""
    path = f"\0moe-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            conn.settimeout(30)
            threading.Thread(target=script, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return ChannelAddress(path=path)


def says_ok(conn: socket.socket) -> None:
    conn.sendall(os.urandom(NONCE_BYTES))
    conn.recv(1 << 10)
    conn.sendall(b"\0" * 32)  # "you are welcome", with no proof of the secret behind it
    closed(conn)


def reflects(conn: socket.socket) -> None:
    conn.sendall(os.urandom(NONCE_BYTES))
    said = conn.recv(1 << 10)
    conn.sendall(said[-32:])  # the coordinator's own proof, sent back as if it were the worker's
    closed(conn)


def hangs_up(conn: socket.socket) -> None:
    conn.sendall(os.urandom(NONCE_BYTES))
    conn.recv(1 << 10)
    conn.close()


@pytest.mark.parametrize("script", [says_ok, reflects, hangs_up])
def test_a_coordinator_refuses_a_worker_that_does_not_know_the_secret(script: Callable[[socket.socket], None]) -> None:
    with pytest.raises(BadFrame, match="secret"):
        impostor(script).connect(SECRET, timeout_s=30)
    real = ChannelServer(fake_expert, secret=SECRET, limits=LIMITS).open(same_node=True, node_ip="127.0.0.1")
    assert served(real, within_s=0)


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


class NextAddressLink:
    """A WorkerLink to one worker whose every new connection goes to the next of `addresses`, the
    last for good: a misbehaving worker, replaced by a real one."""

    def __init__(self, addresses: list[ChannelAddress], *, timeout_s: float) -> None:
        self.addresses = addresses
        self.timeout_s = timeout_s
        self.connections = 0
        self.restarted: list[int] = []

    def connect_all(self) -> list[socket.socket]:
        return [self.connect(0)]

    def connect(self, worker: int) -> socket.socket:
        address = self.addresses[min(self.connections, len(self.addresses) - 1)]
        self.connections += 1
        return address.connect(SECRET, timeout_s=self.timeout_s)

    def restart(self, worker: int) -> None:
        self.restarted.append(worker)


def real_worker() -> ChannelAddress:
    return ChannelServer(fake_expert, secret=SECRET, limits=LIMITS).open(same_node=True, node_ip="127.0.0.1")


def replies_with(
    header: Callable[[int], bytes], body: Callable[[bytes], bytes] = lambda elements: b""
) -> tuple[ChannelAddress, list[float]]:
    """A worker that passes the handshake, reads a request, answers `header(request id)` + `body(the
    request's elements)`, and then says nothing; the times at which its peers hung up on it."""
    hung_up: list[float] = []

    def script(conn: socket.socket) -> None:
        challenge(conn, SECRET)
        request = recv_tensor(conn, LIMITS)
        conn.sendall(header(request.request_id) + body(bytes(request.x.numpy().data)))
        if closed(conn):
            hung_up.append(time.monotonic())

    return impostor(script), hung_up


@pytest.mark.parametrize(
    "header",
    [
        lambda rid: HEADER.pack(OK, 1 << 30, D, 0, rid, 0),  # 256 GiB of float32
        lambda rid: HEADER.pack(OK, (1 << 30) // (4 * D), D, 0, rid, 0),  # a GiB: within the frame limit
        lambda rid: HEADER.pack(OK, 3, D, 0, rid, 0),  # a row more than it was sent
        lambda rid: HEADER.pack(OK, 2, D + 1, 0, rid, 0),  # not the hidden size
        lambda rid: HEADER.pack(OK, 2, D, 3, rid, 0),  # float64 for float32
        lambda rid: HEADER.pack(OK, 2, D, 0, rid + 5, 0),  # an answer to a request never sent
    ],
    ids=["2**30-rows", "a-GiB-of-rows", "a-row-more", "cols", "dtype", "unsent-id"],
)
def test_a_reply_header_unlike_its_request_replaces_the_worker_before_anything_is_allocated(
    header: Callable[[int], bytes],
) -> None:
    hostile, hung_up = replies_with(header)
    link = NextAddressLink([hostile, real_worker()], timeout_s=20)
    transport = ChannelTransport(link)
    x = torch.randn(2, D)
    start = time.monotonic()
    out = transport.gather(transport.submit(1, {0: batch(x)}))
    assert torch.equal(out[0], fake_expert(1, x))  # answered by its replacement: no call lost
    assert link.restarted == [0]  # a worker that speaks garbage is not trusted to serve again
    assert eventually(lambda: len(hung_up) == 1) and hung_up[0] - start < 5  # hung up on at the header, not at a timeout
    transport.close()


def test_a_reply_header_unlike_its_request_fails_the_step_once_replacements_run_out() -> None:
    hostile, _ = replies_with(lambda rid: HEADER.pack(OK, 2, D + 1, 0, rid, 0))
    transport = ChannelTransport(NextAddressLink([hostile], timeout_s=20), max_replacements=0)
    with pytest.raises(BadFrame, match=f"\\[2, {D + 1}\\]"):
        transport.gather(transport.submit(1, {0: batch(torch.randn(2, D))}))
    assert transport.sockets[0].fileno() == -1
    transport.close()


def test_a_reply_cut_off_by_the_last_timeout_closes_its_socket() -> None:
    hostile, hung_up = replies_with(lambda rid: HEADER.pack(OK, 2, D, 0, rid, 0), lambda elements: elements[: len(elements) // 2])
    link = NextAddressLink([hostile, real_worker()], timeout_s=1)
    transport = ChannelTransport(link, max_replacements=0)
    with pytest.raises(TimeoutError):
        transport.gather(transport.submit(1, {0: batch(torch.randn(2, D))}))
    assert transport.sockets[0].fileno() == -1  # the half-read frame is never read on from
    assert eventually(lambda: len(hung_up) == 1)
    x = torch.randn(3, D)  # the next call goes to a new connection, and reads its own reply
    assert torch.equal(transport.gather(transport.submit(2, {0: batch(x)}))[0], fake_expert(2, x))
    transport.close()


def test_a_gather_gives_up_replacing_a_worker_after_its_retry_budget_and_shows_how_long_it_waited() -> None:
    def silent(conn: socket.socket) -> None:  # takes its calls and never answers, however often replaced
        with contextlib.suppress(OSError):  # until the coordinator hangs up
            challenge(conn, SECRET)
            while True:
                recv_tensor(conn, LIMITS)

    link = NextAddressLink([impostor(silent)], timeout_s=0.2)
    transport = ChannelTransport(link, max_replacements=1000, retry_budget_s=1.0)
    waited: list[float | None] = []
    watcher = threading.Timer(0.5, lambda: waited.append(transport.waiting_since))
    watcher.start()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="not back within 1 s"):
        transport.gather(transport.submit(1, {0: batch(torch.randn(2, D))}))
    assert link.connections < 100  # the budget ended it, not the thousand replacements allowed
    assert waited and waited[0] is not None and waited[0] >= start  # /health sees the wait while it lasts
    assert transport.waiting_since is None  # and not after
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
