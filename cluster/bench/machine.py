"""This machine's ceilings, measured: memory bandwidth and matmul rate, and a model's decode floor."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from cluster.planning.cost_model import ModelCost, busy_experts
from mixtral.config import ModelArgs


@dataclass(frozen=True)
class Machine:
    cores: int
    bandwidth_gbs: float  # bytes read per second by a reduction over a large tensor, GB/s
    matmul_gflops: dict[str, float]  # by dtype name, a large square matmul

    def to_dict(self) -> dict:
        return asdict(self)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls, after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_machine(dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> Machine:
    """Uses every core, as the whole machine's ceiling."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        weights = torch.ones(64 << 20)  # 256 MB of float32: far past the caches
        read_s = median_seconds(lambda: weights.sum(), 5)
        rates = {name: matmul_gflops(getattr(torch, name)) for name in dtypes}
    finally:
        torch.set_num_threads(threads)
    return Machine(cores=os.cpu_count() or 1, bandwidth_gbs=weights.nbytes / read_s / 1e9, matmul_gflops=rates)


def matmul_gflops(dtype: torch.dtype, *, largest: int = 2048, budget_s: float = 0.2) -> float:
    """A square matmul's rate, at the largest size up to `largest` whose one call stays within `budget_s`:
    where a dtype has no fast kernel (bf16 on a CPU without it, emulated), a 2048 one takes minutes."""
    size, rate = 256, 0.0
    while True:
        a = torch.randn(size, size).to(dtype)
        seconds = median_seconds(functools.partial(torch.matmul, a, a), 3)
        rate = 2 * size**3 / seconds / 1e9
        if size >= largest or 8 * seconds > budget_s:  # the next size takes 8 times as long
            return rate
        size *= 2


def decode_floor_seconds(args: ModelArgs, machine: Machine, *, batch: int, dtype: str) -> float:
    """The least time one decode step of `batch` tokens can take here: weights read once, FLOPs at peak."""
    cost = ModelCost.of(args)
    layers = args.num_hidden_layers
    per_layer = cost.attention_params + cost.gate_params
    touched = layers * (per_layer + busy_experts(batch, args.num_local_experts, args.num_experts_per_tok) * cost.expert_params)
    touched += cost.head_params
    multiplied = layers * (per_layer + args.num_experts_per_tok * cost.expert_params) + cost.head_params
    bytes_per_param = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    memory_s = touched * bytes_per_param / (machine.bandwidth_gbs * 1e9)  # a step only reads the weights
    # Half-precision weights can be computed on in float32 where that is faster (workers.device).
    rate = max(machine.matmul_gflops[dtype], machine.matmul_gflops.get("float32", 0.0))
    compute_s = 2 * batch * multiplied / (rate * 1e9)
    return max(memory_s, compute_s)
