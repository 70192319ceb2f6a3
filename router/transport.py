"""[Dispatch] transports: how a layer's per-worker token batches reach the workers and come back.

A transport gets, for one layer, a dict worker -> batch (tokens [T_w, D] and the segments saying
which of its experts each run of rows is for) holding only busy workers, and returns worker ->
output [T_w, D] on the device the tokens came from, with one batched call per busy worker.
`submit` starts the calls and returns at once; `gather` waits for them. The split lets the
coordinator work on one micro-batch while the experts work on the other.

This is the coordinator's side. The worker's side is workers.channel.ExpertChannel; the socket
implementation of both is router.channel_transport.ChannelTransport over workers.channel_server.
Who starts, restarts and reconnects the workers is not the transport's business: it asks a
WorkerLink (cluster.supervisor on Ray).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch

from router.wire import Segment


class WorkerBatch(NamedTuple):
    x: torch.Tensor  # [T_w, D]
    segments: tuple[Segment, ...]  # (expert, rows) runs of x, in order


class ExpertTransport(Protocol):
    # Since when (time.monotonic()) a gather has been waiting on its workers, or None: a stuck or
    # replaced worker shows as a wait that grows (cluster.engine_host reports it on /health).
    waiting_since: float | None

    def submit(self, layer: int, inputs: Mapping[int, WorkerBatch]) -> Any: ...

    def gather(self, pending: Any) -> dict[int, torch.Tensor]: ...

    def abandon(self) -> None:
        """A step failed between submits and gathers: forget what it still has in flight."""
        ...


class WorkerLink(Protocol):
    """How a socket transport reaches its workers' channels, and has a stuck worker replaced."""

    def connect_all(self) -> list[socket.socket]:
        """A connection to each worker's channel, in worker order, each past its handshake."""
        ...

    def connect(self, worker: int) -> socket.socket:
        """A new connection to `worker`, past its handshake, waiting for it while it is being restarted."""
        ...

    def restart(self, worker: int) -> None:
        """Have `worker` killed, stuck (it holds our tokens and says nothing) or broken (it answers
        garbage); it comes back with its experts."""
        ...


class WorkerLike(Protocol):
    def forward(self, layer: int, x: torch.Tensor, segments: Sequence[Segment] = ...) -> torch.Tensor: ...


class LocalTransport:
    """Workers in this process: the baseline and the test double for the Ray path. Runs at submit."""

    def __init__(self, workers: Sequence[WorkerLike]) -> None:
        self.workers = workers
        self.waiting_since: float | None = None  # never waits: the work is done at submit

    def submit(self, layer: int, inputs: Mapping[int, WorkerBatch]) -> dict[int, torch.Tensor]:
        return {w: self.workers[w].forward(layer, b.x, b.segments).to(b.x.device) for w, b in inputs.items()}

    def gather(self, pending: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return pending

    def abandon(self) -> None:
        pass
