"""The frame that carries one expert's activations over a socket, each way.

    frame = header(tag, rows, cols, dtype) + rows * cols elements, row-major

A request's tag is the layer; a reply's tag is OK, or ERROR with `rows` bytes of UTF-8 text
instead of elements. Bytes go straight from the tensor's memory to the socket and back into a
fresh tensor's memory: no pickling, no intermediate copy.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import torch

HEADER = struct.Struct("<iiii")  # tag, rows, cols, dtype code
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
OK = 0
ERROR = -1


@dataclass(frozen=True)
class ChannelAddress:
    """Where an expert worker listens (workers.channel_server)."""

    path: str | None = None  # a Unix socket on the same node
    host: str | None = None  # or TCP
    port: int = 0

    def connect(self) -> socket.socket:
        if self.path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.path)
        else:
            sock = socket.create_connection((self.host, self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames are latency-bound
        return sock


class ChannelClosed(ConnectionError):
    """The other end went away (a worker that died, or a coordinator that left)."""


class RemoteError(RuntimeError):
    """The expert worker raised while computing; its message is carried over."""


def _bytes(t: torch.Tensor) -> memoryview:
    # A uint8 view of the same memory: what the socket reads from or writes into.
    return t.reshape(-1).view(torch.uint8).numpy().data


def send_tensor(sock: socket.socket, tag: int, x: torch.Tensor) -> None:
    """x [rows, cols] on the CPU."""
    x = x.contiguous()
    sock.sendall(HEADER.pack(tag, x.shape[0], x.shape[1], DTYPES.index(x.dtype)))
    if x.numel():
        sock.sendall(_bytes(x))


def send_error(sock: socket.socket, message: str) -> None:
    text = message.encode()
    sock.sendall(HEADER.pack(ERROR, len(text), 0, 0) + text)


def _recv_into(sock: socket.socket, buffer: memoryview) -> None:
    while buffer.nbytes:
        n = sock.recv_into(buffer)
        if n == 0:
            raise ChannelClosed("the expert channel closed mid-frame")
        buffer = buffer[n:]


def recv_tensor(sock: socket.socket) -> tuple[int, torch.Tensor]:
    """The next frame: (tag, tensor). An ERROR frame raises RemoteError with its text."""
    header = bytearray(HEADER.size)
    _recv_into(sock, memoryview(header))
    tag, rows, cols, code = HEADER.unpack(header)
    if tag == ERROR:
        text = bytearray(rows)
        _recv_into(sock, memoryview(text))
        raise RemoteError(text.decode(errors="replace"))
    out = torch.empty(rows, cols, dtype=DTYPES[code])
    if out.numel():
        _recv_into(sock, _bytes(out))
    return tag, out
