"""Tokens per expert per layer: the seed of the load-balancing metrics."""

from __future__ import annotations


class ExpertLoad:
    """Counts (token, expert) assignments per layer, since start and for the latest step."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.total = [[0] * num_experts for _ in range(num_layers)]
        self.last_step = [[0] * num_experts for _ in range(num_layers)]

    def record(self, layer: int, counts: list[int]) -> None:
        self.last_step[layer] = list(counts)
        row = self.total[layer]
        for e, c in enumerate(counts):
            row[e] += c

    def snapshot(self) -> list[list[int]]:
        return [list(row) for row in self.total]
