"""Per-request sampling: greedy, temperature, top-k, top-p; seeded per request."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from cluster.errors import UserError

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20
# Below this a temperature is greedy, as vLLM treats it: dividing logits by 1e-300 gives inf and NaN.
GREEDY_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0  # as OpenAI bounds it
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256  # characters of one stop string
MAX_STOP_TOKEN_IDS = 64
SEED_RANGE = (-(2**63), 2**64)  # int64 and uint64 seeds alike; torch takes the value mod 2^64


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = -1  # keep the k most likely tokens; -1 keeps all
    seed: int | None = None  # same seed, same tokens
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the engine's caller with a tokenizer checks them
    ignore_eos: bool = False
    logprobs: int | None = None  # also return this many most likely alternatives per token

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self) -> None:
        """The one check of sampling fields, for HTTP, gRPC and the CLI alike; UserError says how to fix."""
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise UserError(f"temperature must be a number from 0 (greedy) to {MAX_TEMPERATURE:g}, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise UserError(f"top_k must be -1 (all tokens) or at least 1, got {self.top_k}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise UserError(f"seed must be a 64-bit integer, from -2^63 to 2^64 - 1, got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise UserError(f"give at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_LENGTH} characters each")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise UserError(f"give at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise UserError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed % 2**64 if params.seed is not None else int(torch.randint(2**62, ()).item()))
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from float32 logits [V]."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k > 0:
        kth = torch.topk(probs, min(params.top_k, probs.shape[-1])).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of more likely tokens
        drop = before >= params.top_p * sorted_probs.sum()
        drop[0] = False  # the most likely token always stays, even where top_p * mass underflows to 0
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of float32 logits [B, V].

    The greedy rows (the common case) take one argmax over the batch: at 64 sequences of mini's
    vocabulary, choosing and reading back their logprobs took 4 ms a step row by row and 2 ms
    batched. Rows that sample use their own seeded generator; a row whose sampling fails gets
    FAILED, and only its own request ends, never the batch.
    """
    greedy = torch.argmax(logits, dim=-1).tolist()
    return [
        greedy[row] if p.greedy else _sample_or_fail(logits[row], p, g)
        for row, (p, g) in enumerate(zip(params, generators, strict=True))
    ]


FAILED = -1


def _sample_or_fail(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    try:
        return sample(logits, params, generator)
    except Exception:
        log.exception("sampling failed for one request (%s); it ends with an error, the batch goes on", params)
        return FAILED
