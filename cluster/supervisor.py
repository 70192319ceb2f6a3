"""Supervision of a replica's expert workers: their channels opened, a stuck one killed (Ray
restarts it), a restarted one reconnected and given the experts the current map says it holds.

The socket transport (router.channel_transport) reaches this through router.transport.WorkerLink,
so that the MoE layer's package knows nothing of Ray.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from router.wire import ChannelAddress

RECONNECT_DEADLINE_S = 300.0  # how long a restarting worker may take to load its experts again


class WorkerSupervisor:
    """The WorkerLink over expert worker actors (workers.expert_worker, or any actor with
    `open_channel(node)` and `hold_only(experts)`), whose channels take `secret`."""

    def __init__(self, workers: Sequence[Any], *, coordinator_node: str, secret: bytes, timeout_s: float = 60.0) -> None:
        self.workers = workers
        self.coordinator_node = coordinator_node  # a worker on this node listens on a Unix socket
        self.secret = secret
        self.timeout_s = timeout_s  # of every read and write on a channel, and of every call here
        self.holdings: list[list[int]] | None = None  # per worker, once a rebalance changed them

    @classmethod
    def here(cls, workers: Sequence[Any], *, secret: bytes, timeout_s: float = 60.0) -> WorkerSupervisor:
        """For a coordinator in this process (a Ray actor, or a driver)."""
        return cls(workers, coordinator_node=ray.get_runtime_context().get_node_id(), secret=secret, timeout_s=timeout_s)

    def set_holdings(self, holdings: Sequence[Sequence[int]]) -> None:
        """From now on worker w holds holdings[w] (a new expert map): a worker restarted later gets them first."""
        self.holdings = [list(h) for h in holdings]

    def connect_all(self) -> list[socket.socket]:
        # All workers open their channels at once: one round of Ray calls, not one per worker.
        addresses = ray.get([w.open_channel.remote(self.coordinator_node) for w in self.workers])
        return [self._connect_first(w, address) for w, address in enumerate(addresses)]

    def _connect_first(self, worker: int, address: ChannelAddress) -> socket.socket:
        try:
            return address.connect(self.secret, timeout_s=self.timeout_s)
        except OSError:  # turned away (its handshakes are all taken), or down: wait for it as for a restart
            return self.connect(worker)

    def connect(self, worker: int) -> socket.socket:
        """A new connection, waiting (with backoff) for Ray to restart the worker if it is down."""
        handle = self.workers[worker]
        delay, deadline = 0.1, time.monotonic() + RECONNECT_DEADLINE_S
        while True:
            try:
                address = ray.get(handle.open_channel.remote(self.coordinator_node), timeout=self.timeout_s)
                if self.holdings is not None:  # Ray restarts a worker with its first experts: give it today's
                    ray.get(handle.hold_only.remote(self.holdings[worker]), timeout=RECONNECT_DEADLINE_S)
                return address.connect(self.secret, timeout_s=self.timeout_s)
            except (GetTimeoutError, RayActorError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    def restart(self, worker: int) -> None:
        ray.kill(self.workers[worker], no_restart=False)
