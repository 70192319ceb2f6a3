"""The expert channel on its own: frames over a real socket to a real ChannelServer, and the
coordinator's ChannelTransport over real Ray actors that die and come back."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import ray
import torch

from router.transport import ChannelTransport
from router.wire import OK, ChannelAddress, RemoteError, recv_tensor, send_tensor
from workers.channel_server import ChannelServer

LAYERS = 3


def fake_expert(layer: int, x: torch.Tensor) -> torch.Tensor:
    """A layer-dependent function that is exact in every dtype (a column rotation, doubled), so
    replies can be compared bit for bit: no arithmetic that rounds differently across CPUs."""
    if layer >= LAYERS:
        raise IndexError(f"this expert has {LAYERS} layers")
    return torch.roll(x, shifts=layer + 1, dims=1) * 2


@pytest.fixture(params=[True, False], ids=["unix", "tcp"])
def address(request: pytest.FixtureRequest) -> ChannelAddress:
    return ChannelServer(fake_expert).open(same_node=request.param, node_ip="127.0.0.1")


@pytest.fixture
def sock(address: ChannelAddress) -> Iterator:  # type: ignore[type-arg]
    s = address.connect()
    s.settimeout(60)  # a hang fails the test instead of the suite
    yield s
    s.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_round_trip_carries_every_bit(sock, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(5, 64).to(dtype)
    send_tensor(sock, 2, x)
    tag, y = recv_tensor(sock)
    assert tag == OK and y.dtype == dtype
    assert torch.equal(y, fake_expert(2, x))


def test_a_failing_call_is_raised_with_its_message_and_the_worker_keeps_serving(sock) -> None:  # type: ignore[no-untyped-def]
    send_tensor(sock, 7, torch.randn(2, 64))  # there is no layer 7
    with pytest.raises(RemoteError, match="layer 7: IndexError"):
        recv_tensor(sock)
    x = torch.randn(3, 64)
    send_tensor(sock, 1, x)
    assert torch.equal(recv_tensor(sock)[1], fake_expert(1, x))


def test_requests_sent_before_replies_are_read_do_not_deadlock(sock) -> None:  # type: ignore[no-untyped-def]
    # Two micro-batches in flight: the second request goes out before the first reply is read.
    # Frames of 8 MiB are far larger than socket buffers, so a worker that stopped reading while
    # it sent its reply would block the sender forever.
    xs = [torch.randn(32768, 64) for _ in range(2)]
    for layer, x in enumerate(xs):
        send_tensor(sock, layer, x)
    for layer, x in enumerate(xs):
        assert torch.equal(recv_tensor(sock)[1], fake_expert(layer, x))


def slow_expert(layer: int, x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.5)  # long enough that a kill right after sending lands mid-call
    return fake_expert(layer, x)


@ray.remote(num_cpus=0.01, max_restarts=2, max_task_retries=2)  # as cluster.placement starts workers
class FakeWorker:
    """An expert worker reduced to its channel: what ChannelTransport talks to."""

    def __init__(self, layers: int = LAYERS) -> None:
        self.layers = layers
        self.server = ChannelServer(self.forward)

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if layer >= self.layers:
            raise IndexError(f"this worker has {self.layers} layers")
        return slow_expert(layer, x)

    def open_channel(self, coordinator_node: str) -> ChannelAddress:
        return self.server.open(same_node=True, node_ip="127.0.0.1")

    def pid(self) -> int:
        return os.getpid()


def test_a_worker_lost_with_two_layers_in_flight_answers_both(ray_session) -> None:  # type: ignore[no-untyped-def]
    worker = FakeWorker.remote()
    transport = ChannelTransport([worker], coordinator_node="")
    first_pid = ray.get(worker.pid.remote())
    xs = [torch.randn(4, 64) for _ in range(2)]
    pending = [transport.submit(layer, {0: x}) for layer, x in enumerate(xs)]  # two micro-batches
    ray.kill(worker, no_restart=False)
    for layer, (p, x) in enumerate(zip(pending, xs)):
        assert torch.equal(transport.gather(p)[0], fake_expert(layer, x))
    assert ray.get(worker.pid.remote()) != first_pid  # it was restarted and answered both again
    transport.close()
    ray.kill(worker)


def test_a_failed_layer_leaves_no_stale_reply_behind(ray_session) -> None:  # type: ignore[no-untyped-def]
    workers = [FakeWorker.remote(layers=2), FakeWorker.remote()]
    transport = ChannelTransport(workers, coordinator_node="")
    x = torch.randn(3, 64)
    with pytest.raises(RemoteError, match="layer 2: IndexError"):
        transport.gather(transport.submit(2, {0: x, 1: x}))  # worker 0 has no layer 2; worker 1 answers
    out = transport.gather(transport.submit(1, {0: x, 1: x}))  # not worker 1's reply for layer 2
    assert torch.equal(out[0], fake_expert(1, x)) and torch.equal(out[1], fake_expert(1, x))
    transport.close()
    for w in workers:
        ray.kill(w)
