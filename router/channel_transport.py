"""The socket transport: a layer's tokens to expert workers over their channels (router.wire frames).

    submit:  x [T_w, D] -> to_host -> send_tensor ──socket──► worker's ChannelServer (workers.channel_server)
    gather:  output     <- to_device <- recv_tensor ◄──socket── (the worker's forward, staged the same way)

All busy workers get their tokens before any reply is read, so they compute in parallel. Every
request has an id that its reply carries, so a reply is only ever taken for its own request:
replies to requests whose step failed are recognised and dropped. A worker that dies, or does not
answer within its socket's timeout (stopped, partitioned), is restarted through the WorkerLink,
and every call it still owed is sent again on a new connection, in order: no call is lost, and
the tokens are the same.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from router.transport import WorkerBatch, WorkerLink
from router.wire import RemoteError, Segment, recv_tensor, send_tensor, to_device, to_host

# Replacements of one worker within one reply before the step fails; a worker may be restarted
# any number of times over a replica's life, so a later step starts counting afresh.
MAX_REPLACEMENTS = 8


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

    def __init__(self, link: WorkerLink, *, max_replacements: int = MAX_REPLACEMENTS) -> None:
        self.link = link
        self.max_replacements = max_replacements
        self.replacements = 0  # workers replaced for not answering or dying
        self._ids = itertools.count(1)
        self.sockets = link.connect_all()
        self.in_flight: list[deque[InFlightCall]] = [deque() for _ in self.sockets]  # oldest first

    def _replace(self, worker: int, *, stuck: bool) -> None:
        """Have a stuck worker restarted, reconnect, and send what it owed again."""
        self.sockets[worker].close()
        if stuck:
            self.link.restart(worker)
        self.replacements += 1
        self.sockets[worker] = self.link.connect(worker)
        for call in self.in_flight[worker]:
            send_tensor(self.sockets[worker], call.layer, call.x, call.request_id, call.segments)

    def submit(self, layer: int, inputs: Mapping[int, WorkerBatch]) -> PendingLayer:
        device = next(iter(inputs.values())).x.device
        ids = {}
        for w, batch in inputs.items():
            call = InFlightCall(next(self._ids), layer, to_host(batch.x), batch.segments)
            self.in_flight[w].append(call)
            ids[w] = call.request_id
            try:
                send_tensor(self.sockets[w], layer, call.x, call.request_id, call.segments)
            except TimeoutError:
                self._replace(w, stuck=True)
            except OSError:
                self._replace(w, stuck=False)
        return PendingLayer(ids, device)

    def gather(self, pending: PendingLayer) -> dict[int, torch.Tensor]:
        return {
            w: to_device(self._receive(w, request_id, pending.device), pending.device)
            for w, request_id in pending.request_ids.items()
        }

    def abandon(self) -> None:
        """The step failed: what the workers still owe for it is never sent again, and its
        replies, if they come, are recognised by their ids and dropped."""
        for calls in self.in_flight:
            calls.clear()

    def _receive(self, worker: int, request_id: int, device: torch.device) -> torch.Tensor:
        """The reply to `request_id`; replies to older calls (of a step that failed) are dropped."""
        stuck = False
        for attempt in range(self.max_replacements + 1):
            try:
                if attempt:
                    self._replace(worker, stuck=stuck)
                while True:
                    reply_id, reply = self._next_reply(worker, pinned=device.type == "cuda")
                    self._settle(worker, reply_id)
                    if reply_id > request_id:
                        raise RuntimeError(f"worker {worker} answered request {reply_id} before {request_id}")
                    if reply_id == request_id:
                        if isinstance(reply, RemoteError):
                            raise reply
                        return reply
            except TimeoutError:  # stopped or partitioned: it holds our tokens and says nothing
                stuck = True
                if attempt == self.max_replacements:
                    raise
            except OSError:  # ChannelClosed included: the worker died with our tokens
                stuck = False
                if attempt == self.max_replacements:
                    raise
        raise AssertionError("unreachable")

    def _next_reply(self, worker: int, *, pinned: bool) -> tuple[int, torch.Tensor | RemoteError]:
        """(request id, output) of the next reply on `worker`'s socket; a failed call's error as its output."""
        try:
            reply = recv_tensor(self.sockets[worker], pinned=pinned)
            return reply.request_id, reply.x
        except RemoteError as e:
            return e.request_id, e

    def _settle(self, worker: int, reply_id: int) -> None:
        """Forget what `worker` owed up to this reply: replies come in request order."""
        calls = self.in_flight[worker]
        while calls and calls[0].request_id <= reply_id:
            calls.popleft()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
