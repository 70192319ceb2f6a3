"""[Dispatch] transports: how a layer's per-expert token batches reach the experts and come back.

A transport gets, for one layer, a dict expert -> tokens [T_e, D] holding only busy experts, and
returns expert -> output [T_e, D], with one batched call per busy expert. `submit` starts the
calls and returns at once; `gather` waits for them. The split lets the coordinator work on one
micro-batch while the experts work on the other.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from router.wire import recv_tensor, send_tensor

MAX_RESENDS = 3  # as many as Ray's restarts of a worker (cluster.placement)


class ExpertTransport(Protocol):
    def submit(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> Any: ...

    def gather(self, pending: Any) -> dict[int, torch.Tensor]: ...


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


@dataclass(frozen=True)
class PendingLayer:
    experts: list[int]  # busy experts, each owing one reply
    device: torch.device  # where the outputs go (the coordinator's)


class ChannelTransport:
    """Experts as Ray actors, each reached over its own socket (workers.channel_server).

    All busy workers get their tokens before any reply is read, so they compute in parallel.
    Replies on a socket come in the order of its requests. A worker that dies is restarted by Ray
    (it reloads its expert); every request it still owed is sent again on a new connection, in
    order, so no request is lost, with one or two micro-batches in flight.
    """

    def __init__(self, workers: Sequence[Any], coordinator_node: str) -> None:
        import ray

        self.workers = workers
        self.coordinator_node = coordinator_node
        # All workers open their channels at once: one round of Ray calls, not one per worker.
        addresses = ray.get([w.open_channel.remote(coordinator_node) for w in workers])
        self.sockets = [address.connect() for address in addresses]
        self.owed: list[deque[tuple[int, torch.Tensor]]] = [deque() for _ in workers]  # (layer, tokens) sent, not answered

    def _connect(self, expert: int) -> socket.socket:
        import ray

        # Waits for Ray to restart the worker if it is down.
        return ray.get(self.workers[expert].open_channel.remote(self.coordinator_node)).connect()

    def _resend(self, expert: int) -> None:
        """A new connection to `expert`, and everything it owed sent again."""
        self.sockets[expert].close()
        self.sockets[expert] = self._connect(expert)
        for layer, x in self.owed[expert]:
            send_tensor(self.sockets[expert], layer, x)

    def submit(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> PendingLayer:
        device = next(iter(inputs.values())).device
        for e, x in inputs.items():
            self.owed[e].append((layer, x.cpu()))
            try:
                send_tensor(self.sockets[e], layer, self.owed[e][-1][1])
            except OSError:
                self._resend(e)
        return PendingLayer(list(inputs), device)

    def gather(self, pending: PendingLayer) -> dict[int, torch.Tensor]:
        try:
            return {e: self._receive(e).to(pending.device) for e in pending.experts}
        except Exception:
            self._abandon()  # the step fails; no reply of it may be read as a later step's
            raise

    def _abandon(self) -> None:
        for e in range(len(self.workers)):
            self.owed[e].clear()
            self._resend(e)

    def _receive(self, expert: int) -> torch.Tensor:
        for attempt in range(MAX_RESENDS + 1):
            try:
                _, y = recv_tensor(self.sockets[expert])
                self.owed[expert].popleft()
                return y
            except OSError:  # ChannelClosed included: the worker died with our tokens
                if attempt == MAX_RESENDS:
                    raise
                self._resend(expert)
        raise AssertionError("unreachable")

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
