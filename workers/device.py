"""Device and thread settings from what Ray assigned to this process."""

from __future__ import annotations

import os

import torch

# For the actors' runtime_env. torch then puts CPU allocations of 2 MiB and more in transparent huge
# pages (where the kernel allows them), and its allocator reads the variable once, at the process's
# first allocation, so it must be in the environment the process starts with. An expert's decode step
# streams its whole weights through a few tokens; with 4 KiB pages every 4 KiB of them is also a TLB
# miss. Measured on mini (2 cores): a layer of 8 one-token expert calls 28.9 -> 21.2 ms.
HUGE_PAGES_ENV: dict[str, str] = {"THP_MEM_ALLOC_ENABLE": "1"}


def assigned_device() -> str:
    """cuda when Ray gave this actor a GPU that torch can use, else cpu."""
    try:
        import ray

        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:
        gpu_ids = []
    return "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"


def set_threads(cpu_share: float) -> int:
    """One torch thread per whole CPU of the actor's share (at least one): no oversubscription."""
    threads = max(1, int(cpu_share))
    torch.set_num_threads(threads)
    return threads


def set_coordinator_threads(requested: int | None) -> int:
    """The coordinator's torch threads: `requested`, or every core this process may run on.

    The coordinator and the experts take turns within a layer (attention and routing, then the
    experts, then combine), so the cores the experts use are idle during the coordinator's turn.
    Its logical CPU share in the placement group stays small so that it fits beside them.
    """
    threads = requested or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads
