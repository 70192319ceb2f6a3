"""The worker's end of the expert channel: a listening socket served on threads.

Ray places, starts, restarts and asks the worker about itself; the per-layer activations come
over this socket instead (router.wire frames), because a Ray actor call costs about 1.5 ms of
CPU on each side on a small machine, and a decode step of mini makes 64 of them. The threads
block in recv: an idle worker uses no CPU.

On the coordinator's node the socket is a Unix socket (no network at all); from another node it
is TCP on the node's address, the one Ray itself uses. Anyone who can reach the address may
connect, so a connection costs little until it passes the handshake: at most
MAX_PENDING_HANDSHAKES are being checked at a time (others are closed at once, and the coordinator
tries again), each for at most the handshake's time limit. A request's rows reach `forward` on the
worker's device and its outputs leave from there (router.wire.to_device, to_host): on a CPU
worker the bytes go straight from the socket into the tensor and back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import Executor, ThreadPoolExecutor

import torch

from router.wire import (
    OK,
    BadFrame,
    ChannelAddress,
    Frame,
    FrameLimits,
    challenge,
    recv_tensor,
    send_error,
    send_tensor,
    to_device,
    to_host,
)
from workers.channel import Forward

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
MAX_PENDING_HANDSHAKES = 16


def _unix_socket_path() -> str:
    # On Linux an abstract socket (leading NUL): no file, gone with the process, which Ray may
    # kill without running any clean-up. Elsewhere a file in a fresh temporary directory.
    if sys.platform.startswith("linux"):
        return f"\0moe-expert-{uuid.uuid4().hex}"
    return os.path.join(tempfile.mkdtemp(prefix="moe-expert-"), "channel")


class ChannelServer:
    """Serves `forward` to peers that pass the handshake with `secret`, for frames within `limits`.
    A peer that fails either loses its connection; the worker and its other connections go on.
    The socket implementation of workers.channel.ExpertChannel."""

    def __init__(
        self,
        forward: Forward,
        *,
        secret: bytes,
        limits: FrameLimits = FrameLimits(),
        answers: Executor | None = None,
        device: str | torch.device = "cpu",
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,  # the whole handshake's, however the peer trickles
    ) -> None:
        self.forward = forward
        self.secret = secret
        self.limits = limits
        self.device = torch.device(device)  # where `forward` takes its rows and gives its outputs
        # Where requests are computed and answered, in order: one single-thread executor for every
        # connection (the worker's compute thread, so a request passes from the reading thread to
        # the computing one and no further), or None: a thread of its own per connection.
        self.answers = answers
        self.handshake_timeout_s = handshake_timeout_s
        self.addresses: dict[bool, ChannelAddress] = {}  # keyed by "same node as the caller"
        self._pending = threading.BoundedSemaphore(MAX_PENDING_HANDSHAKES)  # a slot per handshake under way
        self._turned_away = 0  # connections closed because every slot was taken
        self._sockets: set[socket.socket] = set()  # listeners and connections, for close
        self._closed = False

    def open(self, *, same_node: bool, node_ip: str) -> ChannelAddress:
        """Listen (once per kind) and return where to connect."""
        if same_node not in self.addresses:
            if same_node:
                path = _unix_socket_path()
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(path)
                address = ChannelAddress(path=path)
            else:
                listener = socket.create_server((node_ip, 0))
                address = ChannelAddress(host=node_ip, port=listener.getsockname()[1])
            listener.listen()
            self._sockets.add(listener)
            threading.Thread(target=self._accept, args=(listener,), daemon=True, name="expert-channel").start()
            self.addresses[same_node] = address
        return self.addresses[same_node]

    def close(self) -> None:
        self._closed = True
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                conn, _ = listener.accept()
            except OSError as e:  # out of file descriptors, say: keep listening, never fall silent
                if self._closed:
                    return
                log.warning("expert channel: accept failed (%s)", e)
                time.sleep(0.1)
                continue
            if not self._pending.acquire(blocking=False):
                self._turn_away(conn)
                continue
            try:
                self._set_up(conn)
            except Exception:  # this connection is lost; the next ones are still served
                log.exception("expert channel: could not set up a connection")
                self._pending.release()
                self._sockets.discard(conn)
                conn.close()

    def _turn_away(self, conn: socket.socket) -> None:
        conn.close()
        self._turned_away += 1
        if self._turned_away & (self._turned_away - 1) == 0:  # at 1, 2, 4, 8...: a flood logs a few lines
            log.warning(
                "expert channel: %d handshakes under way, turned away %d peers", MAX_PENDING_HANDSHAKES, self._turned_away
            )

    def _set_up(self, conn: socket.socket) -> None:
        """Serve `conn` (which holds a handshake slot) on a thread of its own."""
        self._sockets.add(conn)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # One thread per connection: a coordinator that reconnects after a failure of its own
        # is served even while its old connection has not yet been noticed as gone.
        threading.Thread(target=self._serve, args=(conn,), daemon=True, name="expert-channel-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        """Check the peer, then read requests here and have them answered elsewhere, in order.

        Reading never waits for a reply to be taken: with two micro-batches in flight the
        coordinator sends the next request before it reads the last reply, and a worker blocked
        sending a large reply while the coordinator is blocked sending it a request would be a
        deadlock.
        """
        try:
            challenge(conn, self.secret, timeout_s=self.handshake_timeout_s)
            conn.settimeout(None)
        except (BadFrame, OSError) as e:
            log.warning("expert channel: refused a peer (%s)", e)
            self._sockets.discard(conn)
            conn.close()
            return
        finally:
            self._pending.release()
        answers = self.answers or ThreadPoolExecutor(1, thread_name_prefix="expert-channel-answer")
        pinned = self.device.type == "cuda"
        try:
            while True:
                answers.submit(self._answer, conn, recv_tensor(conn, self.limits, pinned=pinned))
        except BadFrame as e:
            log.warning("expert channel: dropped a peer that sent %s", e)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        except OSError:  # ChannelClosed included: the peer went away
            pass
        finally:
            self._sockets.discard(conn)
            answers.submit(conn.close)  # after the answers queued before it
            if answers is not self.answers:
                answers.shutdown(wait=False)

    def _answer(self, conn: socket.socket, request: Frame) -> None:
        layer, request_id, x, segments = request
        with contextlib.suppress(OSError):  # the peer went away: its reader thread ends the connection
            try:
                y = to_host(self.forward(layer, to_device(x, self.device), segments))
            except Exception as exc:  # the coordinator raises it; this worker keeps serving
                send_error(conn, f"expert worker failed on layer {layer}: {type(exc).__name__}: {exc}", request_id)
                return
            send_tensor(conn, OK, y, request_id)
