"""A calibration profile: what this machine's parts cost, measured by `bench` at the model's shapes
(cluster.bench.calibrate).

The planner composes a step's time from these parts; comparing its prediction with the
benchmark's end-to-end measurement on the same machine is how the model is checked.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
CALIBRATION_BATCH = 4


@dataclass(frozen=True)
class Profile:
    cores: int
    dtype: str
    tokens: list[int]  # the token counts the times below were measured at
    expert_ms: list[float]  # one expert FFN call of T tokens, one thread
    coordinator_layer_ms: list[float]  # the real attention (decode at `context`) and the gate for T tokens, all cores
    head_ms: list[float]  # lm_head, log-softmax and sampling for T sequences, all cores
    context: int  # the KV length the attention above was measured at
    dispatch_ms: dict[str, float]  # round trip of one MoE layer's calls with no tokens, by busy experts
    max_num_batched_tokens: int
    # End to end, on the live cluster: median TPOT of a short decode-only run at CALIBRATION_BATCH.
    # The parts above miss what only the whole system shows (the channels' per-call work with real
    # tensors, the engine thread's hand-offs, nine processes sharing the cores); the planner scales its
    # composed step by measured over composed at this one point, and nowhere else uses a measurement.
    calibration_tpot_ms: float
    calibration_ttft_ms: float  # the same run's median TTFT: its prompts' prefill (and first step)
    calibration_prompt_len: int

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @staticmethod
    def load(path: str | Path) -> Profile:
        return Profile(**json.loads(Path(path).read_text()))
