"""`plan --profile`: predictions for the machine `bench` profiled, of bench's own levels or of a request trace."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from cluster.errors import UserError
from mixtral.config import ModelArgs

if TYPE_CHECKING:
    from cluster.cli.plan import PlanArgs


def simulate_trace(shape: ModelArgs, args: PlanArgs) -> None:
    """The trace run through the engine's model on the profile: the report `moe-cluster replay` gives for a server."""
    from cluster.planning.profile import Profile
    from cluster.planning.request_trace import read_request_trace
    from cluster.planning.simulate import simulate
    from cluster.planning.trace_report import report, report_text

    assert args.profile is not None and args.replay is not None
    requests = read_request_trace(args.replay)
    context = shape.max_position_embeddings
    if too_long := [r for r in requests if r.prompt_tokens + r.output_tokens > context]:
        first = too_long[0]
        raise UserError(
            f"{args.replay}: {len(too_long)} requests are longer than {args.model}'s context of {context} tokens "
            f"(the first at {first.timestamp:g} s: {first.prompt_tokens} + {first.output_tokens})"
        )
    outcomes, duration = simulate(
        shape, Profile.load(args.profile), requests, replicas=args.replicas, max_num_seqs=args.max_num_seqs, skew=args.skew
    )
    summary = report(outcomes, duration, ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms)
    print(json.dumps(summary) if args.as_json else report_text(summary))


def predict(shape: ModelArgs, args: PlanArgs) -> None:
    """Predicted bench tokens/s on the profiled machine, beside what bench measured there if bench.json is with it."""
    from cluster.planning.local import predict_bench_tok_s
    from cluster.planning.profile import Profile

    assert args.profile is not None
    prof = Profile.load(args.profile)
    measured: dict[int, float] = {}
    bench_file = args.profile.with_name("bench.json")
    if bench_file.is_file():
        report = json.loads(bench_file.read_text())
        if (report["prompt_len"], report["output_len"]) == (args.prompt_len, args.output_len):
            measured = {r["concurrency"]: r["tok_s"] for r in report["results"]}
    rows = []
    for c in args.concurrency:
        predicted = predict_bench_tok_s(
            shape, prof, concurrency=c, prompt_len=args.prompt_len, output_len=args.output_len, skew=args.skew
        )
        m = measured.get(c)
        extra = f", measured {m:.1f} ({100 * (predicted / m - 1):+.0f}%)" if m else ""
        print(f"concurrency {c}: predicted {predicted:.1f} tok/s{extra}")
        rows.append({"concurrency": c, "predicted_tok_s": predicted, "measured_tok_s": m})
    if args.as_json:
        print(json.dumps({"predictions": rows}))
