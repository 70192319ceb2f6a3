"""Load-balancing metrics: how tokens spread over the experts, layer by layer.

Per layer and expert: tokens routed. Per layer: balancedness = mean / max tokens per expert (1 is
perfectly even; vLLM and SGLang define it so), router entropy (mean over tokens, nats), and the
dispatch round trip of the MoE layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.routing import RoutingPlan


class ExpertLoad:
    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.total = [[0] * num_experts for _ in range(num_layers)]
        self.entropy_sum = [0.0] * num_layers
        self.tokens = [0] * num_layers  # tokens routed per layer (each to top_k experts)
        self.dispatch_seconds = [0.0] * num_layers
        self.dispatch_calls = [0] * num_layers

    def record(self, layer: int, counts: list[int], *, entropy_sum: float, dispatch_seconds: float) -> None:
        row = self.total[layer]
        for e, c in enumerate(counts):
            row[e] += c
        self.tokens[layer] += sum(counts) // self.top_k
        self.entropy_sum[layer] += entropy_sum
        self.dispatch_seconds[layer] += dispatch_seconds
        self.dispatch_calls[layer] += 1

    def layer_routed(self, layer: int, plan: RoutingPlan, seconds: float) -> None:
        self.record(layer, plan.counts, entropy_sum=plan.entropy_sum, dispatch_seconds=seconds)

    def step_done(self) -> None:
        pass

    def snapshot(self) -> list[list[int]]:
        return [list(row) for row in self.total]

    def counters(self) -> dict[str, Any]:
        """The raw sums behind the report: what replicas publish, so that their loads can be added."""
        return {
            "top_k": self.top_k,
            "tokens": self.snapshot(),
            "entropy_sum": list(self.entropy_sum),
            "layer_tokens": list(self.tokens),
            "dispatch_seconds": list(self.dispatch_seconds),
            "dispatch_calls": list(self.dispatch_calls),
        }

    @classmethod
    def summed(cls, counters: list[dict[str, Any]]) -> ExpertLoad:
        """One load over several replicas' counters (ExpertLoad.counters) of one model."""
        first = counters[0]
        load = cls(len(first["tokens"]), len(first["tokens"][0]), first["top_k"])
        for c in counters:
            for layer in range(load.num_layers):
                for e, n in enumerate(c["tokens"][layer]):
                    load.total[layer][e] += n
                load.entropy_sum[layer] += c["entropy_sum"][layer]
                load.tokens[layer] += c["layer_tokens"][layer]
                load.dispatch_seconds[layer] += c["dispatch_seconds"][layer]
                load.dispatch_calls[layer] += c["dispatch_calls"][layer]
        return load

    def report(self) -> dict[str, Any]:
        """The JSON of GET /v1/experts/load (without the model name and worker stats)."""
        return {
            "layers": self.num_layers,
            "experts": self.num_experts,
            "top_k": self.top_k,
            "tokens": self.snapshot(),
            "share": [share(row) for row in self.total],
            "balancedness": [balancedness(row) for row in self.total],
            "router_entropy": [s / n if n else 0.0 for s, n in zip(self.entropy_sum, self.tokens)],
            "dispatch_ms": [1e3 * s / n if n else 0.0 for s, n in zip(self.dispatch_seconds, self.dispatch_calls)],
        }


def share(row: list[int]) -> list[float]:
    total = sum(row)
    return [c / total if total else 0.0 for c in row]


def balancedness(row: Sequence[float]) -> float:
    """mean / max tokens per expert: 1.0 when even, 1/E when one expert takes everything."""
    peak = max(row)
    return (sum(row) / len(row)) / peak if peak else 1.0


class WorkerLoad:
    """Rows computed per worker (an expert's tokens split over its copies), since start: what the
    expert map balances. Balancedness here is mean / max rows per worker."""

    def __init__(self, num_workers: int) -> None:
        self.rows = [0] * num_workers
        self._mark = [0] * num_workers  # rows at the start of the window (the last rebalance)

    def record(self, rows: dict[int, int]) -> None:
        for worker, n in rows.items():
            self.rows[worker] += n

    def snapshot(self) -> list[int]:
        return list(self.rows)

    def mark(self) -> None:
        self._mark = self.snapshot()

    def window(self) -> list[int]:
        """Rows per worker since the last mark."""
        return [a - b for a, b in zip(self.rows, self._mark)]
