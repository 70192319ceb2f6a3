"""`plan --replay`: a request trace through the engine's model on a profile (cluster.planning.simulate),
checked against the step times it is built from, and as the command line prints it."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from cluster.planning.local import composed_step_ms, step_ms
from cluster.planning.planner import model_args
from cluster.planning.profile import Profile
from cluster.planning.request_trace import TracedRequest
from cluster.planning.simulate import simulate
from tests.test_cli import assert_one_line_error, run_cli_here

ARGS = model_args("mini")
# A profile of the shape bench writes (made up: these checks are about the simulation, not a machine).
PROFILE = Profile(
    cores=2,
    dtype="float32",
    tokens=[1, 4, 16, 64, 256, 1024],
    expert_ms=[1.0, 1.1, 1.5, 3.0, 9.0, 33.0],
    coordinator_layer_ms=[0.5, 0.6, 0.9, 2.0, 7.0, 26.0],
    head_ms=[1.0, 1.2, 2.0, 5.0, 17.0, 65.0],
    context=96,
    dispatch_ms={"1": 0.1, "2": 0.12, "8": 0.7},
    max_num_batched_tokens=256,
    calibration_tpot_ms=40.0,
    calibration_ttft_ms=400.0,
    calibration_prompt_len=64,
)


def step_s(tokens: int, sequences: int) -> float:
    return step_ms(ARGS, PROFILE, tokens=tokens, sequences=sequences) / 1e3


def test_a_lone_request_takes_its_prefill_then_a_decode_step_a_token() -> None:
    [alone], duration = simulate(ARGS, PROFILE, [TracedRequest(2.0, 100, 5)])
    assert alone.ttft_s == pytest.approx(step_s(100, 1))  # the whole prompt in one chunk: its first token
    assert alone.tpot_s == pytest.approx(step_s(1, 1))
    assert alone.latency_s == pytest.approx(step_s(100, 1) + 4 * step_s(1, 1))
    assert duration == pytest.approx(alone.latency_s) and alone.output_tokens == 5 and alone.sent_at == 2.0
    # A prompt longer than a step's budget is prefilled in chunks of it.
    [long], _ = simulate(ARGS, PROFILE, [TracedRequest(0.0, 600, 1)])
    assert long.ttft_s == pytest.approx(2 * step_s(256, 1) + step_s(88, 1)) and long.tpot_s is None


def test_requests_at_once_share_steps_queue_past_max_num_seqs_and_spread_over_replicas() -> None:
    burst = [TracedRequest(0.0, 16, 8) for _ in range(4)]
    together, _ = simulate(ARGS, PROFILE, burst)
    assert all(o.ttft_s == pytest.approx(step_s(64, 4)) for o in together)  # one step prefills all four
    assert all(o.tpot_s == pytest.approx(step_s(4, 4)) for o in together)
    queued, _ = simulate(ARGS, PROFILE, burst, max_num_seqs=2)
    first, last = sorted(o.latency_s or 0 for o in queued)[::3]
    assert last > 1.9 * first  # the second pair waits for the first
    spread, _ = simulate(ARGS, PROFILE, burst, replicas=2, max_num_seqs=2)
    assert all(o.ttft_s == pytest.approx(step_s(32, 2)) for o in spread)  # two replicas, two at a time each


def test_plan_replay_reports_as_replay_does_and_needs_a_profile(cli_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(asdict(PROFILE)))
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "".join(json.dumps({"timestamp": i / 4, "prompt_tokens": 64, "output_tokens": 16}) + "\n" for i in range(12))
    )
    proc = run_cli_here("plan", "--model", "mini", "--profile", str(profile), "--replay", str(trace), "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {
        "requests", "completed", "failed", "errors", "duration_s", "output_tokens", "output_tok_s", "requests_per_s",
        "ttft_ms", "tpot_ms", "latency_ms", "targets", "goodput_requests_per_s", "goodput_fraction",
    }  # fmt: skip  # the keys `moe-cluster replay` gives (tests/test_serve.py)
    assert (report["requests"], report["completed"], report["output_tokens"]) == (12, 12, 12 * 16)
    assert_one_line_error(run_cli_here("plan", "--replay", str(trace), env=cli_env), "give --profile")
    trace.write_text(json.dumps({"timestamp": 0, "prompt_tokens": 8000, "output_tokens": 500}) + "\n")
    assert_one_line_error(
        run_cli_here("plan", "--model", "mini", "--profile", str(profile), "--replay", str(trace), env=cli_env),
        "1 requests are longer than mini's context of 8192 tokens",
    )


def test_a_profile_of_one_worker_has_one_dispatch_point_and_it_holds_for_any_busy_experts() -> None:
    """bench measures the dispatch round trip by busy workers; with the CPU default (one worker of every
    expert) that is one point, which the composed step takes as flat, not as a line through nothing."""
    one_point = replace(PROFILE, dispatch_ms={"1": 0.125})
    flat = replace(PROFILE, dispatch_ms={"1": 0.125, "8": 0.125})
    for tokens in (1, 4, 64):
        expected = composed_step_ms(ARGS, flat, tokens=tokens, sequences=tokens)
        assert composed_step_ms(ARGS, one_point, tokens=tokens, sequences=tokens) == pytest.approx(expected)
