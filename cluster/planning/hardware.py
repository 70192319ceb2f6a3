"""Hardware the planner can choose from. Spec-sheet numbers; prices are indicative on-demand cloud
rates per GPU-hour (late 2026), to be replaced by your own with --gpus-file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import UserError


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    bandwidth_gbs: float  # HBM / GDDR, GB/s
    tflops: float  # dense bf16 tensor-core TFLOP/s
    price_per_hour: float  # $ per GPU-hour


@dataclass(frozen=True)
class Interconnect:
    name: str
    bandwidth_gbs: float  # per direction, GB/s
    latency_us: float  # one-way, per message


GPUS: dict[str, Gpu] = {
    g.name: g
    for g in [
        Gpu("T4", 16, 320, 65, 0.35),
        Gpu("L4", 24, 300, 121, 0.80),
        Gpu("A10G", 24, 600, 70, 1.00),
        Gpu("RTX4090", 24, 1008, 165, 0.70),
        Gpu("L40S", 48, 864, 362, 1.90),
        Gpu("A100-40GB", 40, 1555, 312, 3.00),
        Gpu("A100-80GB", 80, 2039, 312, 3.70),
        Gpu("H100-80GB", 80, 3350, 989, 6.00),
    ]
}

# What a CPU expert worker runs on: one server socket's memory bandwidth and bf16 GEMM rate (AVX-512
# BF16/AMX class), and an on-demand price for such a node (a 32-vCPU, 256 GB instance).
CPU_NODE = Gpu("cpu-node", 256, 100, 2.0, 1.60)

INTERCONNECTS: dict[str, Interconnect] = {
    i.name: i
    for i in [
        Interconnect("pcie4", 25, 10),
        Interconnect("nvlink", 300, 3),
        Interconnect("ethernet-25g", 3, 50),
        Interconnect("ethernet-100g", 12, 20),
    ]
}


def load_gpus(extra: Path | None) -> dict[str, Gpu]:
    """The built-in table, plus (or overridden by) a JSON list of Gpu fields."""
    table = dict(GPUS)
    if extra is not None:
        try:
            for entry in json.loads(extra.read_text()):
                gpu = Gpu(**entry)
                table[gpu.name] = gpu
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise UserError(
                f"--gpus-file {extra}: expected a JSON list of {{name, memory_gb, bandwidth_gbs, tflops, price_per_hour}} ({e})"
            ) from None
    return table


def gpu(name: str, table: dict[str, Gpu]) -> Gpu:
    if name not in table:
        raise UserError(f"unknown GPU {name!r}; choose one of {', '.join(table)} or add it with --gpus-file")
    return table[name]


def interconnect(name: str) -> Interconnect:
    if name not in INTERCONNECTS:
        raise UserError(f"unknown interconnect {name!r}; choose one of {', '.join(INTERCONNECTS)}")
    return INTERCONNECTS[name]
