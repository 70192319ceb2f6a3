"""`moe-cluster plan` and `experiments`: capacity planning, without Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.cli.options import Levels, comma_separated, command, finite
from cluster.cli.root import app
from cluster.errors import UserError
from mixtral.config import DType, ExpertDType, ModelArgs

INTERCONNECTS = "pcie4, nvlink, ethernet-25g or ethernet-100g"
DEFAULT_GPUS = ["L4", "A10G", "RTX4090", "A100-80GB", "H100-80GB"]


# Beyond any one fleet's load: a plan for more is a plan for several fleets, and the planner's
# counts of replicas and GPUs stop being numbers a cloud sells.
MAX_REQUESTS_PER_S = 1e6


class PlanArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "mixtral-8x7b", description="A named shape (mixtral-8x7b, mini, tiny; dense: mistral-7b) or a checkpoint directory."
    )
    gpu: str = Field("L4", description="GPU type from the table (see --gpus-file to add your own).")
    gpus_file: Path | None = Field(None, description="JSON list of extra GPU types.")
    interconnect: str = Field("pcie4", description=f"{INTERCONNECTS}.")
    requests_per_s: float = Field(1.0, gt=0, description="Workload: requests per second.")
    prompt_len: int = Field(512, ge=1, description="Workload: prompt tokens per request.")
    output_len: int = Field(256, ge=1, description="Workload: output tokens per request.")
    ttft_ms: float = Field(2000.0, gt=0, description="Target time to first token.")
    tpot_ms: float = Field(100.0, gt=0, description="Target time per output token.")
    skew: float = Field(1.2, ge=1, description="Expert load max/mean (Mixtral paper: ~1.2 on text, ~1.5 on maths).")
    trace: Path | None = Field(None, description="A routing trace: its measured skew replaces --skew.")
    dtype: DType = Field("bfloat16", description="Weights dtype.")
    expert_dtype: ExpertDType | None = Field(None, description="int8: weight-only int8 experts (1 byte a weight).")
    max_experts_per_gpu: int | None = Field(
        None, ge=1, description="Most experts one GPU holds; default: as many as its memory takes."
    )
    cpu_experts: int = Field(0, ge=0, description="Experts held by a CPU worker instead of GPUs (the last ones).")
    replicate_hot: int = Field(0, ge=0, description="Spare expert copies on the GPUs, for rebalancing to give hot experts.")
    profile: Path | None = Field(None, description="A bench profile.json: predict bench on that machine instead.")
    concurrency: Levels = Field([1, 8, 64], description="With --profile: concurrency levels to predict.")
    replay: Path | None = Field(
        None, description="With --profile: simulate this request trace (as `moe-cluster replay` reads) on the profiled machine."
    )
    replicas: int = Field(1, ge=1, description="With --replay: engine replicas the trace's requests spread over.")
    max_num_seqs: int = Field(64, ge=1, description="With --replay: each replica's running sequences (serve's --max-num-seqs).")
    usage: Path | None = Field(
        None, description="A saved GET /v1/engine/stats answer: price each tier at each served model's measured monthly volume."
    )
    plot: Path | None = Field(None, description="Write a cost plot PNG here.")
    as_json: bool = Field(False, description="Last stdout line: one JSON object.", json_schema_extra={"flags": ["--json"]})
    emit: Path | None = Field(
        None, description="Write the expert-parallel plan here as deploy files: Serve config, Ray cluster launcher, RayService."
    )
    max_replicas: int | None = Field(None, ge=1, description="With --emit: most replicas under load (default: twice the plan's).")
    checkpoint_path: str | None = Field(
        None, description="With --emit: the checkpoint's directory on every node (default: /home/ray/models/MODEL)."
    )
    image: str = Field(
        "moe-cluster:latest", description="With --emit: the container image KubeRay runs (deploy/Dockerfile builds one)."
    )

    _finite = field_validator("requests_per_s", "ttft_ms", "tpot_ms", "skew")(finite)

    @field_validator("requests_per_s")
    @classmethod
    def _plannable_load(cls, rate: float) -> float:
        if rate > MAX_REQUESTS_PER_S:
            raise ValueError(f"plans cover up to {MAX_REQUESTS_PER_S:g} requests a second; got {rate:g}")
        return rate

    @field_validator("profile")
    @classmethod
    def _profile_exists(cls, profile: Path | None) -> Path | None:
        if profile is not None and not profile.is_file():
            raise ValueError(f"{profile} does not exist; `moe-cluster bench` writes one into its --out directory")
        return profile


def model_shape(model: str) -> ModelArgs:
    from cluster.planning.planner import model_args
    from mixtral.config import load_args

    return load_args(model) if Path(model).is_dir() else model_args(model)


@command(app, PlanArgs)
def plan(args: PlanArgs) -> None:
    """Plan GPUs, latency and cost for a workload; or, with --profile, predict bench on the profiled machine."""
    from cluster.planning import hardware
    from cluster.planning.measured_usage import read_usage, usage_table
    from cluster.planning.planner import ExpertOptions, Workload
    from cluster.planning.planner import plan as make_plan
    from cluster.planning.report import plan_table, plot_costs

    shape = model_shape(args.model)
    if args.replay is None and args.prompt_len + args.output_len > shape.max_position_embeddings:
        raise UserError(
            f"a request of {args.prompt_len} + {args.output_len} tokens is longer than {args.model}'s context of "
            f"{shape.max_position_embeddings} tokens; plan --prompt-len and --output-len within it"
        )
    if args.replay is not None and args.profile is None:
        raise UserError("--replay simulates the trace on a profiled machine: give --profile (bench writes profile.json)")
    if args.profile is not None:
        if args.usage is not None:
            raise UserError("--usage prices the plan's tiers, and --profile predicts bench instead: give one of them")
        from cluster.cli.profiled import predict, simulate_trace

        return simulate_trace(shape, args) if args.replay is not None else predict(shape, args)
    usage = read_usage(args.usage) if args.usage is not None else None
    skew = args.skew
    if args.trace is not None:
        from router.trace import read_trace

        try:
            skew = read_trace(args.trace).skew()
        except (OSError, ValueError) as e:
            raise UserError(f"--trace: {e}") from None
    gpu = hardware.gpu(args.gpu, hardware.load_gpus(args.gpus_file))
    hardware.check_dtype(gpu, args.dtype)
    plans = make_plan(
        shape,
        gpu,
        hardware.interconnect(args.interconnect),
        Workload(args.requests_per_s, args.prompt_len, args.output_len, args.ttft_ms, args.tpot_ms),
        bytes_per_param=4 if args.dtype == "float32" else 2,
        dtype=args.dtype,
        skew=skew,
        name=Path(args.model).name,
        experts=ExpertOptions(
            int8=args.expert_dtype == "int8",
            max_experts_per_gpu=args.max_experts_per_gpu,
            cpu_experts=args.cpu_experts,
            hot_copies=args.replicate_hot,
        ),
        usage=usage,
    )
    print(plan_table(plans))
    if usage is not None:
        print(usage_table(plans, usage))
    if args.emit is not None:
        from cluster.planning.emit import deploy_spec, write_files

        spec = deploy_spec(
            plans[0],
            model=Path(args.model).name,
            experts=shape.num_local_experts,
            context_length=shape.context_length(None),
            plan_context=args.prompt_len + args.output_len,
            max_replicas=args.max_replicas,
            checkpoint_path=args.checkpoint_path,
            image=args.image,
        )
        for path in write_files(spec, args.emit):
            print(f"wrote {path}", file=sys.stderr)
    if args.plot:
        print(f"cost plot: {plot_costs(plans, args.plot)}", file=sys.stderr)
    if args.as_json:
        extra = {"usage": usage.to_dict()} if usage is not None else {}
        print(json.dumps({"skew": skew, "plans": [p.to_dict() for p in plans]} | extra))


class ExperimentsArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("mixtral-8x7b", description="A named shape or a checkpoint directory.")
    gpus: Annotated[list[str], comma_separated(str, "L4,A10G")] = Field(DEFAULT_GPUS, description="Comma-separated GPU types.")
    skews: Annotated[list[float], comma_separated(float, "1.0,1.2", at_least=1)] = Field(
        [1.0, 1.2, 1.5], description="Comma-separated expert load skews (max/mean), each at least 1."
    )
    batches: Levels = Field([1, 8, 32, 128], description="Comma-separated decode batches, each at least 1.")
    context: int = Field(768, ge=1, description="Tokens per sequence (prompt + output).")
    interconnect: str = Field("pcie4", description=f"{INTERCONNECTS}.")
    out: Path = Field(Path("experiments-out"), description="Directory for experiments.md and experiments.png.")


@command(app, ExperimentsArgs)
def experiments(args: ExperimentsArgs) -> None:
    """Sweep plans over GPU types x skew x batch; write a Markdown table and a plot."""
    from cluster.planning import hardware
    from cluster.planning.experiments import markdown, sweep
    from cluster.planning.experiments import plot as plot_sweep

    table = hardware.load_gpus(None)
    gpus = [hardware.gpu(g, table) for g in args.gpus]
    for gpu in gpus:
        hardware.check_dtype(gpu, "bfloat16")  # the sweep is in bf16
    points = sweep(
        model_shape(args.model),
        gpus,
        hardware.interconnect(args.interconnect),
        skews=args.skews,
        batches=args.batches,
        context=args.context,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(points)
    (args.out / "experiments.md").write_text(text + "\n")
    plot_sweep(
        points, args.out / "experiments.png", f"{Path(args.model).name}, bf16, {args.interconnect}, context {args.context}"
    )
    print(text)
    print(f"wrote {args.out / 'experiments.md'} and {args.out / 'experiments.png'}", file=sys.stderr)
