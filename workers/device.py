"""Device and thread settings from what Ray assigned to this process."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from mixtral.layers import held_matmul, held_matrix

T = TypeVar("T")

# For the actors' runtime_env. torch then puts CPU allocations of 2 MiB and more in transparent huge
# pages (where the kernel allows them), and its allocator reads the variable once, at the process's
# first allocation, so it must be in the environment the process starts with. An expert's decode step
# streams its whole weights through a few tokens; with 4 KiB pages every 4 KiB of them is also a TLB
# miss. Measured on mini (2 cores): a layer of 8 one-token expert calls 28.9 -> 21.2 ms.
HUGE_PAGES_ENV: dict[str, str] = {"THP_MEM_ALLOC_ENABLE": "1"}

# For the same runtime_env. An idle OpenMP thread spins for the next parallel region for this many
# turns of its wait loop before it sleeps (libgomp's default is 300000). Within a process the regions
# follow each other within tens of microseconds, which a short spin covers. But the coordinator and
# its workers take turns on the same cores: with the default, the team that has just finished its turn
# spins on through the other's, holding a core it needs (README, "Performance with a map").
SPIN_ENV: dict[str, str] = {"GOMP_SPINCOUNT": "10000"}
ACTOR_ENV = HUGE_PAGES_ENV | SPIN_ENV


def assigned_device() -> str:
    """cuda when Ray gave this actor a GPU that torch can use, else cpu."""
    try:
        import ray

        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:
        gpu_ids = []
    return "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"


def set_threads(threads: int) -> int:
    """This process's torch threads (at least one)."""
    threads = max(1, threads)
    torch.set_num_threads(threads)
    return threads


# Why an actor keeps its parallel torch work on one thread. libgomp (torch's OpenMP) lets the idle
# threads of a team spin for the next parallel region only while it manages no more threads than
# the process may use cores; above that it throttles the spin to almost nothing. Every thread that
# starts a parallel region keeps a team of its own for as long as it lives. So a second such thread
# in a process (the one that loaded the weights, besides the one that computes) makes every later
# region sleep and wake its team: two context switches a region, which cost one-row GEMMs most
# (README, "Performance with a map").


class ComputeThread:
    """A process's thread for parallel torch work on `threads` threads, so that no other long-lived
    thread has an OpenMP team. `run` waits for work done there (in the caller, with one thread: it
    has no team to keep); `executor` takes work that does not need waiting for, such as answering
    the expert channel (workers.channel_server), in the order it is given."""

    def __init__(self, threads: int, name: str) -> None:
        self.threads = set_threads(threads)  # also the count threads started later begin with
        self._ident: int | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=self._start)

    def _start(self) -> None:
        self._ident = threading.get_ident()
        set_threads(self.threads)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.threads == 1 or threading.get_ident() == self._ident:  # on it already: no wait on itself
            return fn(*args)
        return self.executor.submit(fn, *args).result()


def on_passing_thread(fn: Callable[[], T]) -> T:
    """fn() on a thread that ends when it returns, taking its OpenMP team along (ComputeThread):
    for work done once, such as reading weights, in a process whose compute runs elsewhere."""
    with ThreadPoolExecutor(1, thread_name_prefix="passing") as executor:
        return executor.submit(fn).result()


def set_coordinator_threads(requested: int | None) -> int:
    """The coordinator's torch threads: `requested`, or every core this process may run on.

    The coordinator and the experts take turns within a layer (attention and routing, then the
    experts, then combine), so the cores the experts use are idle during the coordinator's turn.
    Its logical CPU share in the placement group stays small so that it fits beside them.
    """
    threads = requested or cores()
    torch.set_num_threads(threads)
    return threads


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


# A half-precision matmul below this fraction of float32's rate is a slow path: on CPUs without
# native bf16 (AVX512_BF16, AMX) torch emulates it, and an expert call there ran 4x slower than
# transformers' bf16 forward on the same machine.
SLOW_HALF_FRACTION = 0.5


def matmul_rates(
    dtypes: tuple[torch.dtype, ...], device: str, *, tokens: int = 16, size: int = 256, repeats: int = 7
) -> dict[torch.dtype, float]:
    """FLOP/s of an expert-shaped matmul ([tokens, size] @ [size, size], a one-thread worker's layout) in each
    dtype, on the calling thread's threads. Small on purpose: on a slow path one call of it still takes
    milliseconds, not seconds. The fastest of the repeats, and the dtypes take turns: workers measure
    while their neighbours load weights on the same cores, and a float32 call of tens of microseconds
    timed in one burst could have every repeat fall within one preemption."""
    operands = {d: (torch.randn(tokens, size, device=device).to(d), torch.randn(size, size, device=device).to(d)) for d in dtypes}
    for a, b in operands.values():
        torch.matmul(a, b)  # warm-up
    fastest = dict.fromkeys(dtypes, float("inf"))
    for _ in range(repeats):
        for d, (a, b) in operands.items():
            start = time.perf_counter()
            torch.matmul(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            fastest[d] = min(fastest[d], time.perf_counter() - start)
    return {d: 2 * tokens * size * size / max(t, 1e-9) for d, t in fastest.items()}


# Rows tried by half_gemv_rows, and the bytes of half-precision matrices it streams per timing: more
# than a CPU's last-level cache, as an expert's weights are in decode.
HALF_GEMV_ROWS_TRIED = (1, 2, 4, 8)
HALF_GEMV_PROBE_BYTES = 48 << 20
HALF_GEMV_MARGIN = 0.9  # half precision must be this much faster to be worth its copy of the weights


def half_gemv_rows(out_features: int, in_features: int, dtype: torch.dtype, *, packed: bool = False, repeats: int = 3) -> int:
    """The most rows (of HALF_GEMV_ROWS_TRIED) for which F.linear on a half-precision [out, in]
    matrix beats float32 held_matmul on its held copy (`packed` or not, as the worker holds it:
    mixtral.layers.held_matrix), on the calling thread's threads; 0 if none.

    Where the half-precision GEMM is emulated, a worker computes in float32 (matmul_dtype).
    A call of one or two rows is not bound by arithmetic but by reading the weights, and torch's
    half-precision GEMV over the checkpoint's layout reads half the bytes: on two threads of this
    project's machine it beats packed float32 for 1 row and MKL's float32 up to 4, on one thread never (README)."""
    count = max(1, min(64, HALF_GEMV_PROBE_BYTES // max(1, out_features * in_features * dtype.itemsize)))
    rows_probed = min(out_features, max(1, HALF_GEMV_PROBE_BYTES // (in_features * dtype.itemsize)))
    half = [torch.randn(rows_probed, in_features).to(dtype) for _ in range(count)]
    full = [held_matrix(w, torch.float32, packed=packed) for w in half]

    def seconds(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor]) -> float:
        start = time.perf_counter()
        for w in weights:
            op(x, w)
        return time.perf_counter() - start

    most = 0
    for rows in HALF_GEMV_ROWS_TRIED:
        x = torch.randn(rows, in_features)
        x_half = x.to(dtype)
        seconds(torch.nn.functional.linear, x_half, half)  # warm-up
        best_half = best_full = float("inf")
        for _ in range(repeats):  # in turns, as in matmul_rates
            best_half = min(best_half, seconds(torch.nn.functional.linear, x_half, half))
            best_full = min(best_full, seconds(held_matmul, x, full))
        if best_half > HALF_GEMV_MARGIN * best_full:
            break
        most = rows
    return most


def onednn_packs(dtype: torch.dtype, device: str, threads: int) -> bool:
    """Whether matrices in `dtype` on `device`, multiplied on `threads` threads, are held packed for
    oneDNN's GEMM (a worker's: mixtral.layers.held_matrix; the coordinator's: linear_weight): float32 on
    a CPU with oneDNN, on two threads or more. There oneDNN splits a call of a few rows over
    the threads, where MKL's GEMM of a few rows hardly gains from its second; on one thread MKL's GEMV of
    a single row is the faster (README, "Performance with a map")."""
    return dtype == torch.float32 and device == "cpu" and threads > 1 and torch.backends.mkldnn.is_available()


def choose_compute_dtype(dtype: torch.dtype, rates: dict[torch.dtype, float]) -> torch.dtype:
    """`dtype`, unless it is a half precision whose matmul runs below SLOW_HALF_FRACTION of float32's."""
    if dtype == torch.float32 or dtype not in rates:
        return dtype
    return torch.float32 if rates[dtype] < SLOW_HALF_FRACTION * rates[torch.float32] else dtype


@functools.cache
def matmul_dtype(dtype: torch.dtype, device: str) -> torch.dtype:
    """The dtype GEMMs over `dtype` operands run in here (an expert's, the attention's): their own, or
    float32 where this CPU has no fast half-precision matmul (measured once per process). GPUs always
    compute in the operands' dtype."""
    if device != "cpu" or dtype == torch.float32:
        return dtype
    # On one thread: the kernels' own speed. On two, a float32 call of tens of microseconds waits for
    # its second thread to be scheduled, and while neighbours load on the same cores, every repeat
    # can read slower than emulated bf16 (a two-thread worker chose bf16 that way, again and again).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = matmul_rates((dtype, torch.float32), device)
    finally:
        torch.set_num_threads(threads)
    return choose_compute_dtype(dtype, rates)
