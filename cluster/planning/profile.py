"""A calibration profile: what this machine's parts cost, measured by `bench` at the model's shapes.

The planner composes a step's time from these parts; comparing its prediction with the
benchmark's end-to-end measurement on the same machine is how the model is checked.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mixtral.config import MixtralArgs
from mixtral.layers import expert_ffn

TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class Profile:
    cores: int
    dtype: str
    tokens: list[int]  # the token counts the times below were measured at
    expert_ms: list[float]  # one expert FFN call of T tokens, one thread
    coordinator_layer_ms: list[float]  # q, k, v, o projections and the gate for T tokens, one thread
    head_ms: list[float]  # lm_head for T sequences, one thread
    dispatch_ms: dict[str, float]  # round trip of one MoE layer's calls with tiny inputs, by busy experts
    max_num_batched_tokens: int

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @staticmethod
    def load(path: str | Path) -> Profile:
        return Profile(**json.loads(Path(path).read_text()))


def _ms(fn: Any, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def measure_parts(args: MixtralArgs, dtype: str) -> dict[str, list[float]]:
    """Times of the model's parts on one thread, with random weights of the model's shapes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dt = getattr(torch, dtype)
    d, i = args.hidden_size, args.intermediate_size
    q_out = args.num_attention_heads * args.head_dim
    kv_out = args.num_key_value_heads * args.head_dim
    w1, w3, w2 = torch.randn(i, d, dtype=dt), torch.randn(i, d, dtype=dt), torch.randn(d, i, dtype=dt)
    wq, wk, wv, wo = (torch.randn(n, d, dtype=dt) for n in (q_out, kv_out, kv_out, d))
    gate, head = torch.randn(args.num_local_experts, d, dtype=dt), torch.randn(args.vocab_size, d, dtype=dt)
    parts: dict[str, list[float]] = {"expert_ms": [], "coordinator_layer_ms": [], "head_ms": []}
    try:
        for t in TOKEN_COUNTS:
            x = torch.randn(t, d, dtype=dt)
            repeats = 5 if t <= 256 else 2
            parts["expert_ms"].append(_ms(lambda: expert_ffn(x, w1, w2, w3), repeats))
            parts["coordinator_layer_ms"].append(_ms(lambda: [F.linear(x, w) for w in (wq, wk, wv, wo, gate)], repeats))
            parts["head_ms"].append(_ms(lambda: F.linear(x, head), repeats) if t <= 256 else float("nan"))
    finally:
        torch.set_num_threads(threads)
    return parts


def measure_dispatch(workers: list[Any], hidden: int, dtype: str) -> dict[str, float]:
    """Median round trip of one MoE layer's calls to `busy` workers with one token each."""
    import ray

    x = torch.zeros(1, hidden, dtype=getattr(torch, dtype))
    out = {}
    for busy in sorted({1, 2, len(workers)}):
        out[str(busy)] = _ms(lambda: ray.get([w.forward.remote(0, x) for w in workers[:busy]]), 15)
    return out
