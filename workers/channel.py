"""The worker's side of the expert transport: what a worker's channel offers it.

A worker hands its channel a `Forward` (its experts' FFNs of one layer on their rows) and asks it
to `open` a place its coordinator can connect to; the channel then serves every call that comes
in through that function, on the device the worker computes on, and answers in order. The
coordinator's side is router.transport.ExpertTransport; workers.channel_server is the socket
implementation of this side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from router.wire import ChannelAddress, Segment

Forward = Callable[[int, torch.Tensor, tuple[Segment, ...]], torch.Tensor]  # (layer, rows [T, D], whose rows) -> outputs [T, D]


class ExpertChannel(Protocol):
    def open(self, *, same_node: bool, node_ip: str) -> ChannelAddress:
        """Listen (once per kind: on this node, or from others at node_ip) and return where to connect."""
        ...

    def close(self) -> None:
        """Stop listening and drop every connection: the worker is going away."""
        ...
