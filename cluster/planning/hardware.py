"""Hardware the planner can choose from. Spec-sheet numbers; prices are indicative on-demand cloud
rates per GPU-hour (late 2026), to be replaced by your own with --gpus-file."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

from cluster.errors import UserError


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    bandwidth_gbs: float  # HBM / GDDR, GB/s
    tflops: float  # dense bf16 tensor-core TFLOP/s (fp16 where it has no bf16)
    price_per_hour: float  # $ per GPU-hour
    # What its tensor cores compute in: T4 and V100 (Turing, Volta) have no bf16.
    dtypes: tuple[str, ...] = ("bfloat16", "float16", "float32")

    def problem(self) -> str | None:
        """What makes this entry unusable for planning, or None."""
        for name in ("memory_gb", "bandwidth_gbs", "tflops"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                return f"{self.name}: {name} must be a positive number, not {value!r}"
        price = self.price_per_hour
        if isinstance(price, bool) or not (isinstance(price, (int, float)) and math.isfinite(price) and price >= 0):
            return f"{self.name}: price_per_hour must be a number of dollars, not {self.price_per_hour!r}"
        if not self.dtypes or any(d not in ("bfloat16", "float16", "float32") for d in self.dtypes):
            return f"{self.name}: dtypes must name some of bfloat16, float16, float32, not {list(self.dtypes)!r}"
        return None


@dataclass(frozen=True)
class Interconnect:
    name: str
    bandwidth_gbs: float  # per direction, GB/s
    latency_us: float  # one-way, per message


GPUS: dict[str, Gpu] = {
    g.name: g
    for g in [
        Gpu("T4", 16, 320, 65, 0.35, ("float16", "float32")),
        Gpu("L4", 24, 300, 121, 0.80),
        Gpu("A10G", 24, 600, 70, 1.00),
        Gpu("RTX4090", 24, 1008, 165, 0.70),
        Gpu("L40S", 48, 864, 362, 1.90),
        Gpu("A100-40GB", 40, 1555, 312, 3.00),
        Gpu("A100-80GB", 80, 2039, 312, 3.70),
        Gpu("H100-80GB", 80, 3350, 989, 6.00),
    ]
}


@dataclass(frozen=True)
class Instance:
    """A cloud node type with `gpus` of one GPU type (priced at the GPU table's rate a GPU), or the head
    node's type (`price_per_hour` its own)."""

    name: str
    gpus: int
    vcpus: int
    memory_gib: int
    price_per_hour: float | None = None  # $ per node-hour where it has no GPUs to price it by


# AWS instance types with 4 (or 8) GPUs of one kind: a replica of 1 + 8 GPUs spans few nodes. What
# `plan --emit` launches, and so what the planner prices: whole nodes, never single GPUs.
INSTANCES: dict[str, Instance] = {
    "T4": Instance("g4dn.12xlarge", 4, 48, 192),
    "L4": Instance("g6.12xlarge", 4, 48, 192),
    "A10G": Instance("g5.12xlarge", 4, 48, 192),
    "L40S": Instance("g6e.12xlarge", 4, 48, 384),
    "A100-40GB": Instance("p4d.24xlarge", 8, 96, 1152),
    "A100-80GB": Instance("p4de.24xlarge", 8, 96, 1152),
    "H100-80GB": Instance("p5.48xlarge", 8, 192, 2048),
}
# The Ray head of every emitted cluster: serves the HTTP front door and holds no GPU (on-demand, late 2026).
HEAD = Instance("m6i.2xlarge", 0, 8, 32, price_per_hour=0.384)


def nodes_for(gpus: int, instance: Instance) -> int:
    """Nodes of `instance` that hold `gpus` GPUs."""
    return math.ceil(gpus / instance.gpus)


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
        keys = ", ".join(f.name for f in fields(Gpu))
        try:
            for entry in json.loads(extra.read_text()):
                gpu = Gpu(**entry)
                if not isinstance(gpu.dtypes, (list, tuple)):
                    raise UserError(f'--gpus-file {extra}: {gpu.name}: dtypes must be a list, such as ["float16"]')
                gpu = replace(gpu, dtypes=tuple(gpu.dtypes))  # a JSON list as the table's tuple
                if problem := gpu.problem():
                    raise UserError(f"--gpus-file {extra}: {problem}")
                table[gpu.name] = gpu
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise UserError(f"--gpus-file {extra}: expected a JSON list of {{{keys}}} (dtypes optional) ({e})") from None
    return table


def check_dtype(gpu: Gpu, dtype: str) -> None:
    """UserError unless `gpu` computes in `dtype`, saying which it does."""
    if dtype not in gpu.dtypes:
        others = " or ".join(f"--dtype {d}" for d in gpu.dtypes)
        raise UserError(
            f"{gpu.name} has no {dtype} (its tensor cores take {', '.join(gpu.dtypes)}): plan {others}, or another GPU"
        )


def gpu(name: str, table: dict[str, Gpu]) -> Gpu:
    if name not in table:
        raise UserError(f"unknown GPU {name!r}; choose one of {', '.join(table)} or add it with --gpus-file")
    return table[name]


def interconnect(name: str) -> Interconnect:
    if name not in INTERCONNECTS:
        raise UserError(f"unknown interconnect {name!r}; choose one of {', '.join(INTERCONNECTS)}")
    return INTERCONNECTS[name]
