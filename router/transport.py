"""[Dispatch] transports: how a layer's per-worker token batches reach the workers and come back.

A transport gets, for one layer, a dict worker -> batch (tokens [T_w, D] and the segments saying
which of its experts each run of rows is for) holding only busy workers, and returns worker ->
output [T_w, D], with one batched call per busy worker. `submit` starts the
calls and returns at once; `gather` waits for them. The split lets the coordinator work on one
micro-batch while the experts work on the other.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from router.wire import RemoteError, Segment, recv_tensor, send_tensor

# Replacements of one worker within one reply before the step fails; Ray itself restarts a worker
# without limit (cluster.placement), so a later step starts counting afresh.
MAX_REPLACEMENTS = 8
RECONNECT_DEADLINE_S = 300.0  # how long a restarting worker may take to load its experts again


class WorkerBatch(NamedTuple):
    x: torch.Tensor  # [T_w, D]
    segments: tuple[Segment, ...]  # (expert, rows) runs of x, in order


class ExpertTransport(Protocol):
    def submit(self, layer: int, inputs: Mapping[int, WorkerBatch]) -> Any: ...

    def gather(self, pending: Any) -> dict[int, torch.Tensor]: ...

    def abandon(self) -> None:
        """A step failed between submits and gathers: forget what it still has in flight."""
        ...

    def expect(self, holdings: Sequence[Sequence[int]]) -> None:
        """From now on worker w holds holdings[w] (a new expert map): a worker restarted later gets them first."""
        ...


class WorkerLike(Protocol):
    def forward(self, layer: int, x: torch.Tensor, segments: Sequence[Segment] = ...) -> torch.Tensor: ...


class LocalTransport:
    """Workers in this process: the baseline and the test double for the Ray path. Runs at submit."""

    def __init__(self, workers: Sequence[WorkerLike]) -> None:
        self.workers = workers

    def submit(self, layer: int, inputs: Mapping[int, WorkerBatch]) -> dict[int, torch.Tensor]:
        return {w: self.workers[w].forward(layer, b.x, b.segments) for w, b in inputs.items()}

    def gather(self, pending: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return pending

    def abandon(self) -> None:
        pass

    def expect(self, holdings: Sequence[Sequence[int]]) -> None:
        pass  # in-process workers are never restarted


@dataclass(frozen=True)
class PendingLayer:
    request_ids: dict[int, int]  # busy worker -> the id of the request it owes
    device: torch.device  # where the outputs go (the coordinator's)


@dataclass
class Owed:
    request_id: int
    layer: int
    x: torch.Tensor  # [T_w, D] on the CPU, kept until answered so it can be sent again
    segments: tuple[Segment, ...]


class ChannelTransport:
    """Expert workers as Ray actors, each reached over its own authenticated socket (workers.channel_server).

    All busy workers get their tokens before any reply is read, so they compute in parallel.
    Every request has an id that its reply carries, so a reply is only ever taken for its own
    request: replies to requests whose step failed are recognised and dropped. A worker that dies,
    or does not answer within `timeout_s` (stopped, partitioned), is killed and restarted by Ray
    (it reloads its experts), and every request it still owed is sent again on a new connection,
    in order: no request is lost, and the tokens are the same.
    """

    def __init__(
        self,
        workers: Sequence[Any],
        coordinator_node: str,
        secret: bytes,
        *,
        timeout_s: float = 60.0,
        max_replacements: int = MAX_REPLACEMENTS,
    ) -> None:
        import ray

        self.workers = workers
        self.max_replacements = max_replacements
        self.coordinator_node = coordinator_node
        self.secret = secret
        self.timeout_s = timeout_s
        self.replacements = 0  # workers killed and replaced for not answering or dying
        self._ids = itertools.count(1)
        # All workers open their channels at once: one round of Ray calls, not one per worker.
        addresses = ray.get([w.open_channel.remote(coordinator_node) for w in workers])
        self.sockets = [address.connect(secret, timeout_s=timeout_s) for address in addresses]
        self.owed: list[deque[Owed]] = [deque() for _ in workers]  # sent, not answered, oldest first
        self.holdings: list[list[int]] | None = None  # per worker, once a rebalance changed them

    def expect(self, holdings: Sequence[Sequence[int]]) -> None:
        self.holdings = [list(h) for h in holdings]

    def _connect(self, worker: int) -> socket.socket:
        """A new connection, waiting (with backoff) for Ray to restart the worker if it is down."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        delay, deadline = 0.1, time.monotonic() + RECONNECT_DEADLINE_S
        while True:
            try:
                address = ray.get(self.workers[worker].open_channel.remote(self.coordinator_node), timeout=self.timeout_s)
                if self.holdings is not None:  # Ray restarts a worker with its first experts: give it today's
                    ray.get(self.workers[worker].hold_only.remote(self.holdings[worker]), timeout=RECONNECT_DEADLINE_S)
                return address.connect(self.secret, timeout_s=self.timeout_s)
            except (GetTimeoutError, RayActorError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    def _replace(self, worker: int, *, kill: bool) -> None:
        """Kill the worker if it is stuck (Ray restarts it), reconnect, and send what it owed again."""
        import ray

        self.sockets[worker].close()
        if kill:
            ray.kill(self.workers[worker], no_restart=False)
        self.replacements += 1
        self.sockets[worker] = self._connect(worker)
        for owed in self.owed[worker]:
            send_tensor(self.sockets[worker], owed.layer, owed.x, owed.request_id, owed.segments)

    def submit(self, layer: int, inputs: Mapping[int, WorkerBatch]) -> PendingLayer:
        device = next(iter(inputs.values())).x.device
        ids = {}
        for w, batch in inputs.items():
            owed = Owed(next(self._ids), layer, batch.x.cpu(), batch.segments)
            self.owed[w].append(owed)
            ids[w] = owed.request_id
            try:
                send_tensor(self.sockets[w], layer, owed.x, owed.request_id, owed.segments)
            except TimeoutError:
                self._replace(w, kill=True)
            except OSError:
                self._replace(w, kill=False)
        return PendingLayer(ids, device)

    def gather(self, pending: PendingLayer) -> dict[int, torch.Tensor]:
        return {e: self._receive(e, request_id).to(pending.device) for e, request_id in pending.request_ids.items()}

    def abandon(self) -> None:
        """The step failed: what the workers still owe for it is never sent again, and its
        replies, if they come, are recognised by their ids and dropped."""
        for owed in self.owed:
            owed.clear()

    def _receive(self, worker: int, request_id: int) -> torch.Tensor:
        """The reply to `request_id`; replies to older requests (of a step that failed) are dropped."""
        stuck = False
        for attempt in range(self.max_replacements + 1):
            try:
                if attempt:
                    self._replace(worker, kill=stuck)
                while True:
                    reply_id, reply = self._next_reply(worker)
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

    def _next_reply(self, worker: int) -> tuple[int, torch.Tensor | RemoteError]:
        """(request id, output) of the next reply on `worker`'s socket; a failed call's error as its output."""
        try:
            reply = recv_tensor(self.sockets[worker])
            return reply.request_id, reply.x
        except RemoteError as e:
            return e.request_id, e

    def _settle(self, worker: int, reply_id: int) -> None:
        """Forget what `worker` owed up to this reply: replies come in request order."""
        owed = self.owed[worker]
        while owed and owed[0].request_id <= reply_id:
            owed.popleft()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
