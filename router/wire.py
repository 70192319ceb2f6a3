"""The frame that carries one expert's activations over a socket, each way, and the handshake.

    handshake: worker      -> nonce_w                                                (32 random bytes)
               coordinator -> nonce_c + HMAC(secret, "coordinator" + nonce_w + nonce_c)
               worker      -> HMAC(secret, "worker" + nonce_w + nonce_c)  (each end checks the other's)
    frame     = header(tag, rows, cols, dtype, request id, segments)
                + segments * (expert, rows)      # which expert's tokens the rows are, in order
                + rows * cols elements, row-major

The secret is made per replica and handed to both ends through Ray, so only the coordinator that
started a worker can talk to it, and a coordinator sends activations only to a worker that proved
it holds the secret (not to whatever else listens on the address). The role names in the proofs
keep one end's proof from being sent back as the other's. The bytes are not encrypted.

A request's tag is the layer, and its segments say which of the worker's experts each run of rows
goes to; a reply has no segments, and carries the request's id and tag OK, or ERROR with `rows`
bytes of UTF-8 text instead of elements. Every header is checked against the receiver's limits
before anything is allocated. Bytes go straight from the tensor's memory to the socket and back
into a fresh tensor's memory: no pickling, no intermediate copy.

The socket reads and writes host memory, so a tensor on a GPU is staged through a pinned host
buffer (`to_host` before a send, `to_device` after a receive into a pinned tensor); a CPU tensor
is sent and received as it is, with no copy at all.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

HEADER = struct.Struct("<iiiiQi")  # tag, rows, cols, dtype code, request id, segments
Header = tuple[int, int, int, int, int, int]  # HEADER's fields, unpacked
SEGMENT = struct.Struct("<ii")  # expert, rows
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
OK = 0
ERROR = -1
NONCE_BYTES = 32
PROOF_BYTES = 32  # HMAC-SHA256
MAX_ERROR_BYTES = 64 << 10


@dataclass(frozen=True)
class ChannelAddress:
    """Where an expert worker listens (workers.channel_server)."""

    path: str | None = None  # a Unix socket on the same node
    host: str | None = None  # or TCP
    port: int = 0

    def connect(self, secret: bytes, *, timeout_s: float | None = None) -> socket.socket:
        """A connection on which each end proved it holds `secret` (BadFrame if the worker did not);
        reads and writes time out after timeout_s."""
        if self.path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            sock.connect(self.path)
        else:
            sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames are latency-bound
        try:
            answer_challenge(sock, secret)
        except ChannelClosed as e:
            sock.close()
            raise BadFrame(
                "the worker hung up in the handshake: it does not take this replica's channel secret, "
                "or has as many handshakes under way as it allows"
            ) from e
        except BaseException:
            sock.close()
            raise
        return sock


@dataclass(frozen=True)
class FrameLimits:
    """What a receiver accepts: a header outside these closes the connection, nothing allocated."""

    max_bytes: int = 1 << 30  # of one frame's elements
    cols: int | None = None  # the hidden size, when the receiver knows it
    tags: range | None = None  # the layers, for a worker
    experts: range = range(0)  # the experts a request's segments may name (a worker's model's); none for replies


class Segment(NamedTuple):
    expert: int
    rows: int


class Frame(NamedTuple):
    tag: int
    request_id: int
    x: torch.Tensor  # [rows, cols]
    segments: tuple[Segment, ...]  # a request's runs of rows per expert; () in a reply


class ChannelClosed(ConnectionError):
    """The other end went away (a worker that died, or a coordinator that left)."""


class BadFrame(ConnectionError):
    """A header the receiver does not accept, or a peer that failed the handshake."""


class RemoteError(RuntimeError):
    """The expert worker raised while computing; its message is carried over."""

    def __init__(self, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.request_id = request_id


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def _proof(secret: bytes, role: bytes, worker_nonce: bytes, coordinator_nonce: bytes) -> bytes:
    return hmac.new(secret, role + worker_nonce + coordinator_nonce, hashlib.sha256).digest()


def challenge(conn: socket.socket, secret: bytes, *, timeout_s: float | None = None) -> None:
    """The worker's side of the handshake: raise BadFrame unless the peer knows the secret, then
    prove that this end knows it too. The whole of it takes at most timeout_s (TimeoutError)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    nonce = secrets.token_bytes(NONCE_BYTES)
    conn.sendall(nonce)
    said = _recv_by(conn, NONCE_BYTES + PROOF_BYTES, deadline)
    theirs, proof = said[:NONCE_BYTES], said[NONCE_BYTES:]
    if not hmac.compare_digest(proof, _proof(secret, b"coordinator", nonce, theirs)):
        raise BadFrame("the peer does not know this replica's channel secret")
    conn.sendall(_proof(secret, b"worker", nonce, theirs))


def answer_challenge(sock: socket.socket, secret: bytes) -> None:
    """The coordinator's side: prove it knows the secret, and raise BadFrame unless the worker does."""
    theirs = _recv_by(sock, NONCE_BYTES, None)
    nonce = secrets.token_bytes(NONCE_BYTES)
    sock.sendall(nonce + _proof(secret, b"coordinator", theirs, nonce))
    if not hmac.compare_digest(_recv_by(sock, PROOF_BYTES, None), _proof(secret, b"worker", theirs, nonce)):
        raise BadFrame("the worker does not know this replica's channel secret: an impostor on its address")


def _recv_by(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    """`size` bytes, all of them by `deadline` (time.monotonic) if one is given: a peer that
    trickles them in a byte at a time cannot hold the connection for longer."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view.nbytes:
        if deadline is not None:
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
        n = sock.recv_into(view)
        if n == 0:
            raise ChannelClosed("the expert channel closed in the handshake")
        view = view[n:]
    return bytes(buffer)


def _bytes(t: torch.Tensor) -> memoryview:
    # A uint8 view of the same memory: what the socket reads from or writes into.
    return t.reshape(-1).view(torch.uint8).numpy().data


def to_host(x: torch.Tensor) -> torch.Tensor:
    """x where the socket can read it: x itself on the CPU; a GPU tensor copied into pinned host memory."""
    if x.device.type == "cpu":
        return x
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()  # the copy is done before the socket reads it
    return host


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A received tensor (pinned when `device` is a GPU: recv_tensor(pinned=True)) on `device`."""
    return x if device.type == "cpu" else x.to(device, non_blocking=True)


def send_tensor(sock: socket.socket, tag: int, x: torch.Tensor, request_id: int, segments: Sequence[Segment] = ()) -> None:
    """x [rows, cols] on the CPU (to_host); for a request, `segments` say whose rows they are, in order."""
    x = x.contiguous()
    header = HEADER.pack(tag, x.shape[0], x.shape[1], DTYPES.index(x.dtype), request_id, len(segments))
    sock.sendall(header + b"".join(SEGMENT.pack(*s) for s in segments))
    if x.numel():
        sock.sendall(_bytes(x))


def send_error(sock: socket.socket, message: str, request_id: int) -> None:
    text = message.encode()[:MAX_ERROR_BYTES]
    sock.sendall(HEADER.pack(ERROR, len(text), 0, 0, request_id, 0) + text)


def _recv_into(sock: socket.socket, buffer: memoryview) -> None:
    while buffer.nbytes:
        n = sock.recv_into(buffer)
        if n == 0:
            raise ChannelClosed("the expert channel closed mid-frame")
        buffer = buffer[n:]


def _check(tag: int, rows: int, cols: int, code: int, num_segments: int, limits: FrameLimits) -> None:
    if tag == ERROR and limits.tags is not None:
        raise BadFrame("an error frame sent to a worker")
    if not 0 <= num_segments <= len(limits.experts):
        raise BadFrame(f"{num_segments} segments, of at most {len(limits.experts)} experts")
    if tag == ERROR:
        if not 0 <= rows <= MAX_ERROR_BYTES:
            raise BadFrame(f"an error frame of {rows} bytes")
        return
    if limits.tags is not None and tag not in limits.tags:
        raise BadFrame(f"tag {tag} is not one of {limits.tags}")
    if not 0 <= code < len(DTYPES):
        raise BadFrame(f"dtype code {code}")
    if rows < 0 or cols < 0 or (limits.cols is not None and cols != limits.cols):
        raise BadFrame(f"a frame of [{rows}, {cols}]")
    if rows * cols * DTYPES[code].itemsize > limits.max_bytes:
        raise BadFrame(f"a frame of [{rows}, {cols}] {DTYPES[code]} is over {limits.max_bytes} bytes")


def _segments(sock: socket.socket, count: int, rows: int, limits: FrameLimits) -> tuple[Segment, ...]:
    raw = bytearray(count * SEGMENT.size)
    _recv_into(sock, memoryview(raw))
    segments = tuple(Segment(*SEGMENT.unpack_from(raw, i * SEGMENT.size)) for i in range(count))
    if any(s.expert not in limits.experts or s.rows < 0 for s in segments) or sum(s.rows for s in segments) != rows:
        raise BadFrame(f"segments {list(segments)} do not cover {rows} rows of experts {limits.experts}")
    return segments


def recv_header(sock: socket.socket) -> Header:
    """The next frame's header, unchecked: (tag, rows, cols, dtype code, request id, segments).
    Pass it to recv_frame, which checks it before reading the rest."""
    raw = bytearray(HEADER.size)
    _recv_into(sock, memoryview(raw))
    header: Header = HEADER.unpack(raw)
    return header


def recv_frame(sock: socket.socket, header: Header, limits: FrameLimits, *, pinned: bool = False) -> Frame:
    """The rest of the frame `header` (recv_header) begins, as recv_tensor."""
    tag, rows, cols, code, request_id, num_segments = header
    _check(tag, rows, cols, code, num_segments, limits)
    segments = _segments(sock, num_segments, rows, limits) if limits.experts and tag != ERROR else ()
    if tag == ERROR:
        text = bytearray(rows)
        _recv_into(sock, memoryview(text))
        raise RemoteError(text.decode(errors="replace"), request_id)
    out = torch.empty(rows, cols, dtype=DTYPES[code], pin_memory=pinned)
    if out.numel():
        _recv_into(sock, _bytes(out))
    return Frame(tag, request_id, out, segments)


def recv_tensor(sock: socket.socket, limits: FrameLimits = FrameLimits(), *, pinned: bool = False) -> Frame:
    """The next frame, its tensor in pinned host memory if asked (to go on to a GPU). An ERROR frame
    raises RemoteError with its text (its request id in `RemoteError.request_id`); a header or
    segments outside `limits` raise BadFrame."""
    return recv_frame(sock, recv_header(sock), limits, pinned=pinned)
