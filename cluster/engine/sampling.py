"""Per-request sampling: greedy, temperature, top-k, top-p; seeded per request."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cluster.errors import FieldError

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20
# Below this a temperature is greedy, as vLLM treats it: dividing logits by 1e-300 gives inf and NaN.
GREEDY_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0  # as OpenAI bounds it
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256  # characters of one stop string
MAX_STOP_TOKEN_IDS = 64
MAX_SCORE_TOKEN_IDS = 16  # labels a classifying request scores (cluster.serve.moderation has 4)
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
    # Also return the logprob of each of these tokens at every step, in this order, in place of the
    # alternatives: a classifier's label tokens (self-moderation reads them after one prefill).
    score_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self) -> None:
        """The one check of sampling fields, for HTTP, gRPC and the CLI alike; FieldError says how to fix."""
        for name in SAMPLING_RULES:
            check_sampling_field(name, getattr(self, name))


# The sampling rules, one per field of SamplingParams: what is wrong with a value, or None. The
# engine applies them all (SamplingParams.validate); the HTTP edge applies each to its field of
# the request body as it parses it (cluster.serve.openai_api).
def _max_tokens(v: int) -> str | None:
    return None if v >= 1 else f"must be at least 1, got {v}"


def _temperature(v: float) -> str | None:
    return (
        None
        if math.isfinite(v) and 0 <= v <= MAX_TEMPERATURE
        else f"must be a number from 0 (greedy) to {MAX_TEMPERATURE:g}, got {v}"
    )


def _top_p(v: float) -> str | None:
    return None if math.isfinite(v) and 0 < v <= 1 else f"must be in (0, 1], got {v}"


def _top_k(v: int) -> str | None:
    return None if v == -1 or v >= 1 else f"must be -1 (all tokens) or at least 1, got {v}"


def _seed(v: int | None) -> str | None:
    return (
        None if v is None or SEED_RANGE[0] <= v < SEED_RANGE[1] else f"must be a 64-bit integer, from -2^63 to 2^64 - 1, got {v}"
    )


def _stop(v: tuple[str, ...]) -> str | None:
    fits = len(v) <= MAX_STOP_STRINGS and all(len(s) <= MAX_STOP_LENGTH for s in v)
    return None if fits else f"must be at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters each"


def _stop_token_ids(v: tuple[int, ...]) -> str | None:
    return None if len(v) <= MAX_STOP_TOKEN_IDS else f"must be at most {MAX_STOP_TOKEN_IDS} token ids"


def _score_token_ids(v: tuple[int, ...]) -> str | None:
    return None if len(v) <= MAX_SCORE_TOKEN_IDS else f"must be at most {MAX_SCORE_TOKEN_IDS} token ids"


def _logprobs(v: int | None) -> str | None:
    return None if v is None or 0 <= v <= MAX_LOGPROBS else f"must be between 0 and {MAX_LOGPROBS}, got {v}"


SAMPLING_RULES: dict[str, Callable[[Any], str | None]] = {
    "max_tokens": _max_tokens,
    "temperature": _temperature,
    "top_p": _top_p,
    "top_k": _top_k,
    "seed": _seed,
    "stop": _stop,
    "stop_token_ids": _stop_token_ids,
    "logprobs": _logprobs,
    "score_token_ids": _score_token_ids,
}


def check_sampling_field(name: str, value: Any, *, called: str | None = None) -> None:
    """Raise FieldError, naming the field and saying how to fix it, if `value` breaks the rule of field
    `name` (`called`: the field's name where the caller knows it by another, as a request body may)."""
    problem = SAMPLING_RULES[name](value)
    if problem is not None:
        raise FieldError(called or name, f"{called or name} {problem}")


class Draws:
    """A sequence's random draws. The draw for the token at position p (its index in prompt + output)
    depends on (seed, p) alone, not on the draws before it: a request continued elsewhere from its
    prompt and the tokens it had sent (cluster.serve.ingress) draws what the original would have."""

    def __init__(self, seed: int) -> None:
        self.seed = seed % 2**64
        self._generator = torch.Generator()

    def at(self, position: int) -> torch.Generator:
        """The generator for the token at `position` (one generator, seeded again for each draw)."""
        self._generator.manual_seed(_splitmix64(self.seed ^ _splitmix64(position)))
        return self._generator


def _splitmix64(x: int) -> int:
    """A 64-bit mix (SplitMix64's finaliser): nearby (seed, position) pairs give unrelated seeds."""
    x = (x + 0x9E3779B97F4A7C15) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


def draws_for(params: SamplingParams) -> Draws | None:
    """None for greedy requests; a seeded request's own seed, or a fresh one (a continuation of an
    unseeded request draws afresh)."""
    if params.greedy:
        return None
    return Draws(params.seed if params.seed is not None else int(torch.randint(2**62, ()).item()))


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

    The greedy rows (the common case) take one argmax over the batch, a single kernel and a single
    read-back instead of one per row. Rows that sample use their own seeded generator; a row whose
    sampling fails gets FAILED, and only its own request ends, never the batch.
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
