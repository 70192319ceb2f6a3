"""The expert channel on its own: frames over a real socket to a real ChannelServer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from router.wire import OK, ChannelAddress, RemoteError, recv_tensor, send_tensor
from workers.channel_server import ChannelServer

WEIGHTS = [torch.randn(64, 64, dtype=torch.float64) for _ in range(3)]  # one [D, D] matrix per "layer"


def fake_expert(layer: int, x: torch.Tensor) -> torch.Tensor:
    return x @ WEIGHTS[layer].to(x.dtype)


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
def test_a_round_trip_is_bit_exact(sock, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
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
