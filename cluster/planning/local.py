"""Predictions for the machine a profile was measured on, composed from its measured parts.

A step of T tokens over S sequences: per layer, the coordinator's attention and gate for T tokens
(measured at the benchmark's context), the dispatch round trip to the busy workers, and the
experts; then the lm_head and sampling for S sequences. The workers share the machine's cores,
so expert time is the larger of the busiest expert and all experts' work spread over the cores.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from cluster.planning.cost_model import busy_experts
from cluster.planning.profile import CALIBRATION_BATCH, Profile
from mixtral.config import ModelArgs


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise linear through measured points (nan entries skipped), extended linearly past the last;
    flat where one point was measured (a profile's dispatch with a single worker: one round trip whatever
    the busy experts)."""
    points = [(a, b) for a, b in zip(xs, ys) if not math.isnan(b)]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if x <= xs[0] or len(xs) == 1:
        return ys[0]
    i = min(bisect.bisect_left(xs, x), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def composed_step_ms(args: ModelArgs, profile: Profile, *, tokens: int, sequences: int, skew: float = 1.0) -> float:
    k, e = args.num_experts_per_tok, args.num_local_experts
    busy = busy_experts(tokens, e, k)
    per_busy = tokens * k / busy
    hot = min(tokens, skew * per_busy)
    experts = max(
        interpolate(profile.tokens, profile.expert_ms, hot),
        busy * interpolate(profile.tokens, profile.expert_ms, per_busy) / profile.cores,
    )
    dispatch_points = sorted((int(n), ms) for n, ms in profile.dispatch_ms.items())
    dispatch = interpolate([n for n, _ in dispatch_points], [ms for _, ms in dispatch_points], busy)
    coordinator = interpolate(profile.tokens, profile.coordinator_layer_ms, tokens)
    head = interpolate(profile.tokens, profile.head_ms, sequences)
    return args.num_hidden_layers * (coordinator + dispatch + experts) + head


def step_ms(args: ModelArgs, profile: Profile, *, tokens: int, sequences: int, skew: float = 1.0) -> float:
    """The composed step, scaled by the profile's one end-to-end calibration point."""
    composed_at_calibration = composed_step_ms(args, profile, tokens=CALIBRATION_BATCH, sequences=CALIBRATION_BATCH)
    scale = profile.calibration_tpot_ms / composed_at_calibration
    return scale * composed_step_ms(args, profile, tokens=tokens, sequences=sequences, skew=skew)


def prefill_ms(args: ModelArgs, profile: Profile, *, prompts: int, prompt_len: int, skew: float = 1.0) -> float:
    """Chunked prefill of `prompts` prompts, scaled by the calibration run's measured TTFT."""

    def composed(count: int, length: int) -> float:
        # Requests sent together reach the engine one by one: its thread wakes on the first and
        # prefills it alone; the others arrive during that step and are prefilled in chunks after.
        total = composed_step_ms(args, profile, tokens=length, sequences=1, skew=skew)
        budget, remaining = profile.max_num_batched_tokens, (count - 1) * length
        while remaining > 0:
            chunk = min(budget, remaining)
            total += composed_step_ms(args, profile, tokens=chunk, sequences=max(1, math.ceil(chunk / length)), skew=skew)
            remaining -= chunk
        return total

    scale = profile.calibration_ttft_ms / composed(CALIBRATION_BATCH, profile.calibration_prompt_len)
    return scale * composed(prompts, prompt_len)


def predict_bench_tok_s(
    args: ModelArgs, profile: Profile, *, concurrency: int, prompt_len: int, output_len: int, skew: float = 1.0
) -> float:
    """Output tokens/s of `bench` at one concurrency: chunked prefill of every prompt, then decode steps."""
    prefill = prefill_ms(args, profile, prompts=concurrency, prompt_len=prompt_len, skew=skew)
    decode = (output_len - 1) * step_ms(args, profile, tokens=concurrency, sequences=concurrency, skew=skew)
    return concurrency * output_len / ((prefill + decode) / 1e3)
