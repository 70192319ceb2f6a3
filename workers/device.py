"""Device and thread settings from what Ray assigned to this process."""

from __future__ import annotations

import torch


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
