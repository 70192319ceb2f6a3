"""The expert worker: the experts the map gives it, of every layer, and nothing else.

Stateless apart from weights: a restarted worker reloads its experts and the layer call is
replayed by the caller, so losing one loses no request. Each request's segments name the experts
its rows go to; a worker asked for an expert it does not hold (a map that changed while it
restarted) loads it first, so any request it is sent is answered.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from mixtral import names
from mixtral.checkpoint import Checkpoint, ReadLog
from mixtral.config import ExpertDType, resolve_dtype
from mixtral.int8 import Int8Weight, int8_expert_ffn, quantize
from mixtral.layers import HeldExpert, held_expert_ffn, held_matrix
from router.wire import ChannelAddress, FrameLimits, Segment
from workers.channel import ExpertChannel
from workers.channel_server import ChannelServer
from workers.device import (
    HUGE_PAGES_ENV,
    ComputeThread,
    assigned_device,
    half_gemv_rows,
    matmul_dtype,
    on_passing_thread,
    onednn_packs,
)
from workers.telemetry import Telemetry

Int8Expert = tuple[Int8Weight, Int8Weight, Int8Weight]


@dataclass
class WorkerStats:
    worker: int
    experts: list[int]
    calls: int = 0
    forward_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    tokens: dict[int, int] = field(default_factory=dict)  # rows computed per expert, since start


@dataclass(frozen=True)
class WorkerInfo:
    worker: int
    experts: list[int]
    node_id: str
    gpu_ids: list[str]
    device: str
    pid: int
    threads: int
    huge_pages: bool  # started with HUGE_PAGES_ENV: torch asks for huge pages for its large allocations
    compute_dtype: str  # what its GEMMs run in (workers.device.matmul_dtype)
    half_rows: int  # calls of up to this many rows per expert run in the checkpoint's half precision
    packed: bool  # its float matrices are packed for oneDNN's GEMM (workers.device.onednn_packs)
    expert_dtype: str  # what its expert weights are held in
    expert_bytes: int  # of the expert weights it holds


class ExpertWorker:
    def __init__(
        self,
        checkpoint: Checkpoint,
        experts: int | Sequence[int],
        *,
        worker: int | None = None,
        channel_secret: bytes,
        dtype: str | None = None,
        threads: int = 1,
        expert_dtype: ExpertDType | None = None,
        half_rows: int | None = None,
    ) -> None:
        held = [experts] if isinstance(experts, int) else list(experts)
        self.worker = held[0] if worker is None else worker
        self.compute = ComputeThread(threads, f"expert-worker-{self.worker}")
        self.threads = self.compute.threads
        self.device = assigned_device()
        self.args = args = checkpoint.args
        self.dtype = resolve_dtype(args, dtype)  # of the activations on the wire, as the coordinator's
        self.expert_dtype = expert_dtype
        # Float weights are held in the dtype the GEMMs are fast in here: a bf16 checkpoint on a CPU
        # without bf16 matmul is upcast once, at load (exactly: every bf16 value is a float32 value).
        # int8 weights compute in the wire's dtype, where torch's int8 kernel takes half activations.
        self.compute_dtype = self.dtype if expert_dtype == "int8" else self.compute.run(matmul_dtype, self.dtype, self.device)
        self.packed = expert_dtype != "int8" and onednn_packs(self.compute_dtype, self.device, self.threads)
        # Computing in float32 a half-precision checkpoint, it also keeps the checkpoint's matrices
        # where calls of a few rows are faster on them (workers.device.half_gemv_rows). Given: tests.
        demoted = expert_dtype != "int8" and self.compute_dtype != self.dtype
        if half_rows is None and demoted:
            probe = functools.partial(half_gemv_rows, packed=self.packed)
            half_rows = self.compute.run(probe, args.intermediate_size, args.hidden_size, self.dtype)
        self.half_rows = half_rows if demoted and half_rows else 0
        self.reader = checkpoint.reader()
        self.experts: dict[int, list[HeldExpert] | list[Int8Expert]] = {}
        self._loading = threading.Lock()  # the channel's threads and Ray's calls may both load
        self.stats = WorkerStats(self.worker, [])
        self._stats_lock = threading.Lock()  # the compute thread counts; Ray's threads read (worker_stats)
        self.load_experts(held)
        self.telemetry = Telemetry(checkpoint.name)
        limits = FrameLimits(cols=args.hidden_size, tags=range(args.num_hidden_layers), experts=range(args.num_local_experts))
        self.channel: ExpertChannel = ChannelServer(
            self._forward, secret=channel_secret, limits=limits, answers=self.compute.executor, device=self.device
        )

    def load_experts(self, experts: Sequence[int]) -> list[int]:
        """Read these experts' tensors (only theirs) if not held yet; returns the experts held."""
        return sorted(self._load(experts))

    def _load(self, experts: Sequence[int]) -> dict[int, list[HeldExpert] | list[Int8Expert]]:
        """The held experts with these among them: the dict installed, which a later new map never changes."""
        with self._loading:
            if missing := [e for e in experts if e not in self.experts]:
                self.experts = self.experts | on_passing_thread(lambda: {e: self._read_expert(e) for e in missing})
                self.stats.experts = sorted(self.experts)
            return self.experts

    def hold_only(self, experts: Sequence[int]) -> list[int]:
        """Load these experts and drop every other one (a new map); returns the experts held."""
        self.load_experts(experts)
        with self._loading:
            # A new dict, not deletions: a forward in flight keeps the one it started with.
            self.experts = {e: w for e, w in self.experts.items() if e in experts}
            self.stats.experts = sorted(self.experts)
            return sorted(self.experts)

    def _read_expert(self, expert: int) -> list[HeldExpert] | list[Int8Expert]:
        layers = self.args.num_hidden_layers
        read = self.reader.read(names.expert_weights(layers, expert), dtype=self.dtype, device=self.device)
        per_layer = [[names.expert_weight(layer, expert, w) for w in ("w1", "w2", "w3")] for layer in range(layers)]
        # Each matrix is converted as it is read, so that loading takes one expert's memory and one
        # matrix more, not two experts' (on a GPU sized for one expert, the second would not fit).
        if self.expert_dtype == "int8":
            q = {name: quantize(w) for name, w in read}
            return [(q[n1], q[n2], q[n3]) for n1, n2, n3 in per_layer]
        held, half = {}, {}
        for name, w in read:
            held[name] = held_matrix(w, self.compute_dtype, packed=self.packed)
            if self.half_rows:
                half[name] = w  # the reader's own copy, in the checkpoint's dtype
        return [
            HeldExpert(held[n1], held[n2], held[n3], (half[n1], half[n2], half[n3]) if half else None) for n1, n2, n3 in per_layer
        ]

    def forward(self, layer: int, x: torch.Tensor, segments: Sequence[Segment] = ()) -> torch.Tensor:
        """The experts' FFNs of `layer` on their rows of x: segment (e, n) is the next n rows, for
        expert e; each gets w2(silu(w1 x) * w3 x).  x [T, D] -> [T, D]. No segments: all rows to the
        worker's only expert. Computed on the worker's compute thread, whichever thread asks; the
        outputs are on the worker's device."""
        return self.compute.run(self._forward, layer, x, segments)

    @torch.inference_mode()
    def _forward(self, layer: int, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        start = time.perf_counter()
        if not segments and x.shape[0] == 0:  # a wake-up with no tokens (the benchmark's dispatch round trip)
            return torch.empty(0, x.shape[1], dtype=self.dtype, device=self.device)
        if not segments:
            if len(self.experts) != 1:
                raise ValueError(f"worker {self.worker} holds experts {sorted(self.experts)}: say whose rows are whose")
            segments = (Segment(next(iter(self.experts)), x.shape[0]),)
        if sum(s.rows for s in segments) != x.shape[0]:
            raise ValueError(f"segments {list(segments)} do not cover the {x.shape[0]} rows sent")
        bytes_in = x.nbytes  # as received, before any upcast
        held = self.experts
        if any(s.expert not in held for s in segments):
            held = self._load([s.expert for s in segments])
        x = x.to(self.device)  # in the wire's dtype: each expert call casts to what its matrices need
        outputs, row = [], 0
        for expert, rows in segments:
            outputs.append(self._expert_ffn(held[expert][layer], x[row : row + rows]))
            row += rows
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        self._account(segments, time.perf_counter() - start, bytes_in, y.nbytes)
        return y

    def _expert_ffn(self, weights: HeldExpert | Int8Expert, x: torch.Tensor) -> torch.Tensor:
        if isinstance(weights, HeldExpert):
            return held_expert_ffn(x, weights, half_rows=self.half_rows)
        return int8_expert_ffn(x, *weights)

    def expert_bytes(self) -> int:
        return sum(
            ws.nbytes if isinstance(ws, HeldExpert) else sum(w.nbytes for w in ws)
            for layers in self.experts.values()
            for ws in layers
        )

    def open_channel(self, coordinator_node: str) -> ChannelAddress:
        """Where the coordinator on node `coordinator_node` sends this worker its tokens (router.wire)."""
        import ray

        same_node = ray.get_runtime_context().get_node_id() == coordinator_node
        return self.channel.open(same_node=same_node, node_ip=ray.util.get_node_ip_address())

    def _account(self, segments: Sequence[Segment], seconds: float, bytes_in: int, bytes_out: int) -> None:
        with self._stats_lock:
            for expert, rows in segments:
                self.stats.tokens[expert] = self.stats.tokens.get(expert, 0) + rows
            self.stats.calls += 1
            self.stats.forward_seconds += seconds
            self.stats.bytes_in += bytes_in
            self.stats.bytes_out += bytes_out
        self.telemetry.observe("moe_worker_forward_seconds", seconds, worker=self.worker)
        self.telemetry.inc("moe_worker_bytes_in", bytes_in, worker=self.worker)
        self.telemetry.inc("moe_worker_bytes_out", bytes_out, worker=self.worker)

    def worker_stats(self) -> WorkerStats:
        """Calls, forward time, activation bytes in and out and rows per expert, since start: a copy
        taken between two calls' accounting, since the compute thread goes on counting while Ray
        pickles the answer on another thread."""
        with self._stats_lock:
            return replace(self.stats, experts=list(self.stats.experts), tokens=dict(self.stats.tokens))

    def info(self) -> WorkerInfo:
        """Where this worker runs: node, the GPU ids Ray gave it, device, threads."""
        import ray

        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        return WorkerInfo(
            worker=self.worker,
            experts=sorted(self.experts),
            node_id=ctx.get_node_id() if ctx else "local",
            gpu_ids=[str(g) for g in ray.get_gpu_ids()] if ctx else [],
            device=self.device,
            pid=os.getpid(),
            threads=self.threads,
            huge_pages=all(os.environ.get(k) == v for k, v in HUGE_PAGES_ENV.items()),
            compute_dtype=str(self.compute_dtype).removeprefix("torch."),
            half_rows=self.half_rows,
            packed=self.packed,
            expert_dtype=self.expert_dtype or str(self.compute_dtype).removeprefix("torch."),
            expert_bytes=self.expert_bytes(),
        )

    def read_log(self) -> ReadLog:
        return self.reader.log
