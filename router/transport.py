"""[Dispatch] transports: how a layer's per-expert token batches reach the experts and come back.

A transport gets, for one layer, a dict expert -> tokens [T_e, D] holding only busy experts, and
returns expert -> output [T_e, D], with one batched call per busy expert. `submit` starts the
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
from typing import Any, Protocol

import torch

from router.wire import RemoteError, recv_tensor, send_tensor

# Replacements of one worker within one reply before the step fails; Ray itself restarts a worker
# without limit (cluster.placement), so a later step starts counting afresh.
MAX_REPLACEMENTS = 8
RECONNECT_DEADLINE_S = 300.0  # how long a restarting worker may take to load its expert again


class ExpertTransport(Protocol):
    def submit(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> Any: ...

    def gather(self, pending: Any) -> dict[int, torch.Tensor]: ...

    def abandon(self) -> None:
        """A step failed between submits and gathers: forget what it still has in flight."""
        ...


class ExpertLike(Protocol):
    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...


class LocalTransport:
    """Experts in this process: the baseline and the test double for the Ray path. Runs at submit."""

    def __init__(self, experts: Sequence[ExpertLike]) -> None:
        self.experts = experts

    def submit(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {e: self.experts[e].forward(layer, x) for e, x in inputs.items()}

    def gather(self, pending: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return pending

    def abandon(self) -> None:
        pass


@dataclass(frozen=True)
class PendingLayer:
    request_ids: dict[int, int]  # busy expert -> the id of the request it owes
    device: torch.device  # where the outputs go (the coordinator's)


@dataclass
class Owed:
    request_id: int
    layer: int
    x: torch.Tensor  # [T_e, D] on the CPU, kept until answered so it can be sent again


class ChannelTransport:
    """Experts as Ray actors, each reached over its own authenticated socket (workers.channel_server).

    All busy workers get their tokens before any reply is read, so they compute in parallel.
    Every request has an id that its reply carries, so a reply is only ever taken for its own
    request: replies to requests whose step failed are recognised and dropped. A worker that dies,
    or does not answer within `timeout_s` (stopped, partitioned), is killed and restarted by Ray
    (it reloads its expert), and every request it still owed is sent again on a new connection,
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

    def _connect(self, expert: int) -> socket.socket:
        """A new connection, waiting (with backoff) for Ray to restart the worker if it is down."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        delay, deadline = 0.1, time.monotonic() + RECONNECT_DEADLINE_S
        while True:
            try:
                address = ray.get(self.workers[expert].open_channel.remote(self.coordinator_node), timeout=self.timeout_s)
                return address.connect(self.secret, timeout_s=self.timeout_s)
            except (GetTimeoutError, RayActorError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    def _replace(self, expert: int, *, kill: bool) -> None:
        """Kill the worker if it is stuck (Ray restarts it), reconnect, and send what it owed again."""
        import ray

        self.sockets[expert].close()
        if kill:
            ray.kill(self.workers[expert], no_restart=False)
        self.replacements += 1
        self.sockets[expert] = self._connect(expert)
        for owed in self.owed[expert]:
            send_tensor(self.sockets[expert], owed.layer, owed.x, owed.request_id)

    def submit(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> PendingLayer:
        device = next(iter(inputs.values())).device
        ids = {}
        for e, x in inputs.items():
            owed = Owed(next(self._ids), layer, x.cpu())
            self.owed[e].append(owed)
            ids[e] = owed.request_id
            try:
                send_tensor(self.sockets[e], layer, owed.x, owed.request_id)
            except TimeoutError:
                self._replace(e, kill=True)
            except OSError:
                self._replace(e, kill=False)
        return PendingLayer(ids, device)

    def gather(self, pending: PendingLayer) -> dict[int, torch.Tensor]:
        return {e: self._receive(e, request_id).to(pending.device) for e, request_id in pending.request_ids.items()}

    def abandon(self) -> None:
        """The step failed: what the workers still owe for it is never sent again, and its
        replies, if they come, are recognised by their ids and dropped."""
        for owed in self.owed:
            owed.clear()

    def _receive(self, expert: int, request_id: int) -> torch.Tensor:
        """The reply to `request_id`; replies to older requests (of a step that failed) are dropped."""
        stuck = False
        for attempt in range(self.max_replacements + 1):
            try:
                if attempt:
                    self._replace(expert, kill=stuck)
                while True:
                    reply_id, reply = self._next_reply(expert)
                    self._settle(expert, reply_id)
                    if reply_id > request_id:
                        raise RuntimeError(f"expert {expert} answered request {reply_id} before {request_id}")
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

    def _next_reply(self, expert: int) -> tuple[int, torch.Tensor | RemoteError]:
        """(request id, output) of the next reply on `expert`'s socket; a failed call's error as its output."""
        try:
            _, reply_id, y = recv_tensor(self.sockets[expert])
            return reply_id, y
        except RemoteError as e:
            return e.request_id, e

    def _settle(self, expert: int, reply_id: int) -> None:
        """Forget what `expert` owed up to this reply: replies come in request order."""
        owed = self.owed[expert]
        while owed and owed[0].request_id <= reply_id:
            owed.popleft()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
