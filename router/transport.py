"""[Dispatch] transports: how a layer's per-expert token batches reach the experts and come back.

A transport gets, for one layer, a dict expert -> tokens [T_e, D] holding only busy experts, and
returns expert -> output [T_e, D], with one batched call per busy expert. `submit` starts the
calls and returns at once; `gather` waits for them. The split lets the coordinator work on one
micro-batch while the experts work on the other.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
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


class ChannelTransport:
    """Experts as Ray actors, each reached over its own socket (workers.channel_server).

    All busy workers get their tokens before any reply is read, so they compute in parallel. A
    worker that dies is restarted by Ray (it reloads its expert); its layer call is then sent
    again on a new connection, so no request is lost.
    """

    def __init__(self, workers: Sequence[Any], coordinator_node: str) -> None:
        self.workers = workers
        self.coordinator_node = coordinator_node
        self.sockets = [self._connect(e) for e in range(len(workers))]

    def _connect(self, expert: int) -> socket.socket:
        import ray

        # Waits for Ray to restart the worker if it is down.
        return ray.get(self.workers[expert].open_channel.remote(self.coordinator_node)).connect()

    def _send(self, expert: int, layer: int, x: torch.Tensor) -> None:
        try:
            send_tensor(self.sockets[expert], layer, x)
        except OSError:
            self._reconnect(expert)
            send_tensor(self.sockets[expert], layer, x)

    def _reconnect(self, expert: int) -> None:
        self.sockets[expert].close()
        self.sockets[expert] = self._connect(expert)

    def submit(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> tuple[int, dict[int, torch.Tensor]]:
        cpu = {e: x.cpu() for e, x in inputs.items()}
        for e, x in cpu.items():
            self._send(e, layer, x)
        return layer, cpu

    def gather(self, pending: tuple[int, dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        layer, inputs = pending
        device = next(iter(inputs.values())).device if inputs else None
        return {e: self._receive(e, layer, x).to(device) for e, x in inputs.items()}

    def _receive(self, expert: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        for attempt in range(MAX_RESENDS + 1):
            try:
                return recv_tensor(self.sockets[expert])[1]
            except OSError:  # ChannelClosed included: the worker died with our tokens
                if attempt == MAX_RESENDS:
                    raise
                self._reconnect(expert)
                send_tensor(self.sockets[expert], layer, x)
        raise AssertionError("unreachable")

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
