"""The socket transport: a layer's tokens to expert workers over their channels (router.wire frames).

    submit:  x [T_w, D] -> to_host -> send_tensor ──socket──► worker's ChannelServer (workers.channel_server)
    gather:  output     <- to_device <- recv_tensor ◄──socket── (the worker's forward, staged the same way)

All busy workers get their tokens before any reply is read, so they compute in parallel. Every
request has an id that its reply carries, so a reply is only ever taken for its own request:
replies to requests whose step failed are recognised and dropped. A worker that dies, or does not
answer within its socket's timeout (stopped, partitioned), is restarted through the WorkerLink,
and every call it still owed is sent again on a new connection, in order: no call is lost, and
the tokens are the same.

Every reply header is checked before anything is allocated for it: the reply to the call a worker
owes next has that call's rows, columns and dtype; a reply to an older call (of a step that
failed) is within `max_reply_bytes` and the hidden size. A worker whose reply is unlike that is
broken, not merely slow: it is restarted like a stuck one and its calls sent again, so a worker
that a restart heals loses no call, and one that keeps doing it fails the step after
`max_replacements`. A socket on which a read failed may hold half a frame, so it is closed at once
and never read again.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from router.transport import WorkerBatch, WorkerLink
from router.wire import (
    DTYPES,
    ERROR,
    OK,
    BadFrame,
    FrameLimits,
    Header,
    RemoteError,
    Segment,
    recv_frame,
    recv_header,
    send_tensor,
    to_device,
    to_host,
)

# Replacements of one worker within one reply before the step fails; a worker may be restarted
# any number of times over a replica's life, so a later step starts counting afresh.
MAX_REPLACEMENTS = 8
# How long one gather may spend replacing workers before its step fails (and is recomputed, by
# cluster.engine.core): time for a restarted worker to load its experts, not for ever.
RETRY_BUDGET_S = 300.0


@dataclass(frozen=True)
class PendingLayer:
    request_ids: dict[int, int]  # busy worker -> the id of the call it owes
    device: torch.device  # where the outputs go (the coordinator's)


@dataclass
class InFlightCall:
    """A call sent to a worker and not answered yet."""

    request_id: int
    layer: int
    x: torch.Tensor  # [T_w, D] in host memory, kept until answered so it can be sent again
    segments: tuple[Segment, ...]


class ChannelTransport:
    """Expert workers each reached over their own authenticated socket, opened and restarted by `link`."""

    def __init__(
        self,
        link: WorkerLink,
        *,
        max_replacements: int = MAX_REPLACEMENTS,
        max_reply_bytes: int = 1 << 30,
        retry_budget_s: float = RETRY_BUDGET_S,
    ) -> None:
        self.link = link
        self.max_replacements = max_replacements
        self.retry_budget_s = retry_budget_s  # of one gather's replacements, from its first failure
        self.waiting_since: float | None = None
        self._failed_at: float | None = None  # this gather's first failure
        # A reply to a call no longer owed (of a failed step) is checked against these: its shape is not kept.
        self.reply_limits = FrameLimits(max_bytes=max_reply_bytes)
        self.replacements = 0  # workers replaced for not answering, dying, or sending garbage
        self.hidden_size = 0  # D: the columns of every call
        self._ids = itertools.count(1)
        self.sockets = link.connect_all()
        self.in_flight: list[deque[InFlightCall]] = [deque() for _ in self.sockets]  # oldest first

    def _replace(self, worker: int, *, restart: bool) -> None:
        """Have a stuck or broken worker restarted, reconnect, and send what it owed again."""
        self.sockets[worker].close()
        if restart:
            self.link.restart(worker)
        self.replacements += 1
        self.sockets[worker] = self.link.connect(worker)
        for call in self.in_flight[worker]:
            send_tensor(self.sockets[worker], call.layer, call.x, call.request_id, call.segments)

    def submit(self, layer: int, inputs: Mapping[int, WorkerBatch]) -> PendingLayer:
        x = next(iter(inputs.values())).x
        device, self.hidden_size = x.device, x.shape[1]
        ids = {}
        for w, batch in inputs.items():
            call = InFlightCall(next(self._ids), layer, to_host(batch.x), batch.segments)
            self.in_flight[w].append(call)
            ids[w] = call.request_id
            try:
                send_tensor(self.sockets[w], layer, call.x, call.request_id, call.segments)
            except TimeoutError:
                self._replace(w, restart=True)
            except OSError:
                self._replace(w, restart=False)
        return PendingLayer(ids, device)

    def gather(self, pending: PendingLayer) -> dict[int, torch.Tensor]:
        self.waiting_since, self._failed_at = time.monotonic(), None
        try:
            return {
                w: to_device(self._receive(w, request_id, pending.device), pending.device)
                for w, request_id in pending.request_ids.items()
            }
        finally:
            self.waiting_since = None

    def abandon(self) -> None:
        """The step failed: what the workers still owe for it is never sent again, and its
        replies, if they come, are recognised by their ids and dropped."""
        for calls in self.in_flight:
            calls.clear()

    def _receive(self, worker: int, request_id: int, device: torch.device) -> torch.Tensor:
        """The reply to `request_id`; replies to older calls (of a step that failed) are dropped."""
        restart = False
        for attempt in range(self.max_replacements + 1):
            try:
                if attempt:
                    self._replace(worker, restart=restart)
                while True:
                    reply_id, reply = self._next_reply(worker, request_id, pinned=device.type == "cuda")
                    self._settle(worker, reply_id)
                    if reply_id == request_id:
                        if isinstance(reply, RemoteError):
                            raise reply
                        return reply
            except OSError as e:  # ChannelClosed and BadFrame included
                self.sockets[worker].close()  # it may hold half a frame: never read from it again
                # Stopped or partitioned (it holds our tokens and says nothing), or broken (it
                # speaks garbage): killed and restarted. Died: Ray restarts it already.
                restart = isinstance(e, (TimeoutError, BadFrame))
                if attempt == self.max_replacements:
                    raise
                self._failed_at = self._failed_at or time.monotonic()
                if time.monotonic() - self._failed_at > self.retry_budget_s:
                    raise TimeoutError(
                        f"worker {worker} was not back within {self.retry_budget_s:g} s of replacements; the step fails"
                    ) from e
        raise AssertionError("unreachable")

    def _next_reply(self, worker: int, request_id: int, *, pinned: bool) -> tuple[int, torch.Tensor | RemoteError]:
        """(request id, output) of the next reply on `worker`'s socket, read while awaiting
        `request_id`; a failed call's error as its output."""
        sock = self.sockets[worker]
        header = recv_header(sock)
        self._check_reply(worker, request_id, header)
        try:
            reply = recv_frame(sock, header, self.reply_limits, pinned=pinned)
            return reply.request_id, reply.x
        except RemoteError as e:
            return e.request_id, e

    def _check_reply(self, worker: int, request_id: int, header: Header) -> None:
        """Raise BadFrame unless `header` is of a reply to the call `worker` owes next, with its
        shape and dtype, or to a call that is no longer owed; recv_frame checks the rest."""
        tag, rows, cols, code, reply_id, _ = header
        calls = self.in_flight[worker]
        if calls and reply_id == calls[0].request_id:
            x = calls[0].x
            shape = x.shape
            ok = tag == OK and rows == shape[0] and cols == shape[1] and 0 <= code < len(DTYPES) and DTYPES[code] == x.dtype
            if ok or tag == ERROR:  # an error's text is checked against MAX_ERROR_BYTES by recv_frame
                return
            raise BadFrame(
                f"worker {worker} answered request {reply_id} of [{shape[0]}, {shape[1]}] {x.dtype} "
                f"with tag {tag}, [{rows}, {cols}], dtype code {code}"
            )
        if reply_id >= (calls[0].request_id if calls else request_id + 1):
            raise BadFrame(f"worker {worker} answered request {reply_id}, which it does not owe, before {request_id}")
        if tag not in (OK, ERROR) or (tag == OK and cols != self.hidden_size):
            raise BadFrame(f"worker {worker} answered request {reply_id} with tag {tag}, [{rows}, {cols}]")

    def _settle(self, worker: int, reply_id: int) -> None:
        """Forget what `worker` owed up to this reply: replies come in request order."""
        calls = self.in_flight[worker]
        while calls and calls[0].request_id <= reply_id:
            calls.popleft()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
