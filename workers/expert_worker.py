"""The expert worker: expert e of every layer, and nothing else.

Stateless apart from weights: a restarted worker reloads its expert and the layer call is
replayed by the caller, so losing one loses no request.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from mixtral import names
from mixtral.checkpoint import Checkpoint, ReadLog
from mixtral.config import resolve_dtype
from mixtral.layers import expert_ffn
from router.wire import FrameLimits
from workers.channel_server import ChannelAddress, ChannelServer
from workers.device import HUGE_PAGES_ENV, assigned_device, expert_compute_dtype, set_threads
from workers.telemetry import Telemetry


@dataclass
class WorkerStats:
    expert: int
    calls: int = 0
    forward_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class WorkerInfo:
    expert: int
    node_id: str
    gpu_ids: list[str]
    device: str
    pid: int
    threads: int
    huge_pages: bool  # started with HUGE_PAGES_ENV: torch asks for huge pages for its large allocations
    compute_dtype: str  # what its GEMMs run in (workers.device.expert_compute_dtype)


class ExpertWorker:
    def __init__(
        self, checkpoint: Checkpoint, expert: int, *, channel_secret: bytes, dtype: str | None = None, cpu_share: float = 1.0
    ) -> None:
        self.expert = expert
        self.threads = set_threads(cpu_share)
        self.device = assigned_device()
        args = checkpoint.args
        self.dtype = resolve_dtype(args, dtype)  # of the activations on the wire, as the coordinator's
        # Held in the dtype the GEMMs are fast in here: a bf16 checkpoint on a CPU without bf16 matmul
        # is upcast once, at load (exactly: every bf16 value is a float32 value).
        self.compute_dtype = expert_compute_dtype(self.dtype, self.device)
        self.reader = checkpoint.reader()
        weights = dict(
            self.reader.read(names.expert_weights(args.num_hidden_layers, expert), dtype=self.dtype, device=self.device)
        )
        weights = {name: w.to(self.compute_dtype) for name, w in weights.items()}
        # weights[layer] = (w1 [I, D], w2 [D, I], w3 [I, D])
        self.layers = [
            tuple(weights[names.expert_weight(layer, expert, w)] for w in ("w1", "w2", "w3"))
            for layer in range(args.num_hidden_layers)
        ]
        self.stats = WorkerStats(expert)
        self.telemetry = Telemetry(checkpoint.name)
        limits = FrameLimits(cols=args.hidden_size, tags=range(args.num_hidden_layers))
        self.channel = ChannelServer(self.forward, secret=channel_secret, limits=limits)

    @torch.inference_mode()
    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Expert FFN of `layer` on this expert's tokens: x [T_e, D] -> w2(silu(w1 x) * w3 x) [T_e, D]."""
        start = time.perf_counter()
        w1, w2, w3 = self.layers[layer]
        y = expert_ffn(x.to(self.device, self.compute_dtype), w1, w2, w3).to("cpu", self.dtype)
        self._account(time.perf_counter() - start, x.nbytes, y.nbytes)
        return y

    def open_channel(self, coordinator_node: str) -> ChannelAddress:
        """Where the coordinator on node `coordinator_node` sends this worker its tokens (router.wire)."""
        import ray

        same_node = ray.get_runtime_context().get_node_id() == coordinator_node
        return self.channel.open(same_node=same_node, node_ip=ray.util.get_node_ip_address())

    def _account(self, seconds: float, bytes_in: int, bytes_out: int) -> None:
        self.stats.calls += 1
        self.stats.forward_seconds += seconds
        self.stats.bytes_in += bytes_in
        self.stats.bytes_out += bytes_out
        self.telemetry.observe("moe_worker_forward_seconds", seconds, expert=self.expert)
        self.telemetry.inc("moe_worker_bytes_in", bytes_in, expert=self.expert)
        self.telemetry.inc("moe_worker_bytes_out", bytes_out, expert=self.expert)

    def worker_stats(self) -> WorkerStats:
        """Calls, forward time and activation bytes in and out, since start."""
        return self.stats

    def info(self) -> WorkerInfo:
        """Where this worker runs: node, the GPU ids Ray gave it, device, threads."""
        import ray

        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        return WorkerInfo(
            expert=self.expert,
            node_id=ctx.get_node_id() if ctx else "local",
            gpu_ids=[str(g) for g in ray.get_gpu_ids()] if ctx else [],
            device=self.device,
            pid=os.getpid(),
            threads=self.threads,
            huge_pages=all(os.environ.get(k) == v for k, v in HUGE_PAGES_ENV.items()),
            compute_dtype=str(self.compute_dtype).removeprefix("torch."),
        )

    def read_log(self) -> ReadLog:
        return self.reader.log
