"""Routing traces: each token's chosen experts, per layer, per step, in a compact msgpack file.

Opt-in and bounded: recording stops (and the header-less tail says so) once the file reaches
`max_bytes`. The file is a stream of msgpack objects: first a header
{"version", "layers", "experts", "top_k"}, then one record per MoE layer call
{"step", "layer", "ids": bytes} where ids is the [T, k] uint8 array of chosen experts, row-major.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack
import torch

from router.load import balancedness
from router.routing import RoutingPlan

VERSION = 1


class TraceWriter:
    def __init__(self, path: str | Path, *, layers: int, experts: int, top_k: int, max_bytes: int = 64 << 20) -> None:
        if experts > 256:
            raise ValueError("routing traces store expert ids as uint8: at most 256 experts")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.truncated = False
        self._file: BinaryIO = self.path.open("wb")
        self._write({"version": VERSION, "layers": layers, "experts": experts, "top_k": top_k})
        self._step = 0

    def _write(self, obj: dict) -> None:
        self._file.write(msgpack.packb(obj, use_bin_type=True))

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """topk_ids [T, k] of one MoE layer call."""
        if self.truncated:
            return
        ids = topk_ids.to(torch.uint8).contiguous().numpy().tobytes()
        if self._file.tell() + len(ids) + 64 > self.max_bytes:  # room for the record and the end marker
            self.truncated = True
            self._write({"truncated": True})
            self._file.flush()
            return
        self._write({"step": self._step, "layer": layer, "ids": ids})

    def end_step(self) -> None:
        self._step += 1
        self._file.flush()

    # As a RoutingObserver of the coordinator.
    def layer_routed(self, layer: int, plan: RoutingPlan, seconds: float) -> None:
        self.record(layer, plan.topk_ids)

    def step_done(self) -> None:
        self.end_step()

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class Trace:
    layers: int
    experts: int
    top_k: int
    counts: list[list[int]]  # [L][E] tokens per expert per layer
    steps: int
    truncated: bool

    def skew(self) -> float:
        """Expert load max/mean, averaged over layers (1.0 is perfectly even): the planner's skew,
        the inverse of the load metrics' balancedness."""
        ratios = [1 / balancedness(row) for row in self.counts if sum(row)]
        return sum(ratios) / len(ratios) if ratios else 1.0


def replica_trace_path(path: Path, replica: str) -> Path:
    """Where one Serve replica writes the trace asked for at `path`: routes.msgpack -> routes.<replica>.msgpack."""
    return path.with_name(f"{path.stem}.{replica}{path.suffix}")


def read_trace(path: str | Path) -> Trace:
    """The trace at `path`, or, where replicas wrote one each (replica_trace_path), all of them added up."""
    path = Path(path)
    if path.is_file():
        return _read_one(path)
    files = sorted(path.parent.glob(f"{glob.escape(path.stem)}.*{glob.escape(path.suffix)}"))
    if not files:
        raise FileNotFoundError(f"{path}: no routing trace there, nor per-replica ones ({path.stem}.<replica>{path.suffix})")
    traces = [_read_one(f) for f in files]
    first = traces[0]
    if any((t.layers, t.experts, t.top_k) != (first.layers, first.experts, first.top_k) for t in traces):
        raise ValueError(f"{path}: the per-replica traces are of different models")
    counts = [[sum(t.counts[layer][e] for t in traces) for e in range(first.experts)] for layer in range(first.layers)]
    return Trace(first.layers, first.experts, first.top_k, counts, sum(t.steps for t in traces), any(t.truncated for t in traces))


def _read_one(path: Path) -> Trace:
    with path.open("rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False)
        header = next(unpacker)
        if header.get("version") != VERSION:
            raise ValueError(f"{path}: not a moe-cluster routing trace (version {header.get('version')!r})")
        layers, experts, top_k = header["layers"], header["experts"], header["top_k"]
        counts = [[0] * experts for _ in range(layers)]
        steps, truncated = 0, False
        for record in unpacker:
            if record.get("truncated"):
                truncated = True
                break
            ids = torch.frombuffer(bytearray(record["ids"]), dtype=torch.uint8).long()
            for e, c in enumerate(torch.bincount(ids, minlength=experts).tolist()):
                counts[record["layer"]][e] += c
            steps = max(steps, record["step"] + 1)
    return Trace(layers, experts, top_k, counts, steps, truncated)
