"""The `moe-cluster` command line."""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from cluster.errors import USER_ERRORS, UserError
from cluster.placement_options import Strategy
from cluster.serve.args import ServeArgs
from mixtral.config import DType, ExpertDType

app = typer.Typer(
    help="Expert-parallel Mixtral inference on Ray.", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False
)


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a user's mistake as one line on stderr and exit 2, without a traceback."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"moe-cluster: error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--prompt-ids must be comma-separated non-negative integers such as 1,2,3; got {text!r}") from None
    if any(i < 0 for i in ids):
        raise UserError(f"--prompt-ids must be non-negative; got {text!r}")
    return ids


def start_ray() -> None:
    """Join RAY_ADDRESS when set, else start a local Ray instance for this process."""
    import ray

    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False
    )


@app.command("make-checkpoint")
def make_checkpoint_cmd(
    out: Annotated[Path, typer.Argument(help="Directory to write (must not exist or be empty).")],
    preset: Annotated[str, typer.Option(help="Model shape: tiny or mini.")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
) -> None:
    """Write a random-weight Mixtral checkpoint with transformers' save_pretrained, plus the tokenizer."""
    from mixtral.presets import WRITABLE
    from mixtral.synthetic import make_checkpoint

    with user_errors():
        if preset not in WRITABLE:
            raise UserError(f"--preset must be one of {', '.join(WRITABLE)}; got {preset!r}")
        print(make_checkpoint(out, preset_name=preset, seed=seed, dtype=dtype))


@app.command()
def generate(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint directory, or a preset name (tiny, mini) made on first use.")],
    prompt: Annotated[Optional[str], typer.Option(help="Text prompt, tokenized with BOS.")] = None,
    prompt_ids: Annotated[Optional[str], typer.Option(help="Token ids used verbatim, e.g. 1,2,3 (no BOS added).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate (at least 1).")] = 32,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past EOS.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Last stdout line: one JSON object.")] = False,
    dtype: Annotated[Optional[DType], typer.Option(help="Compute dtype; default: the checkpoint's.")] = None,
    strategy: Annotated[Strategy, typer.Option(help="Placement strategy of the placement group.")] = "PACK",
    experts_per_worker: Annotated[
        Optional[int], typer.Option(help="Experts each worker holds (one call per worker and layer); default 1.")
    ] = None,
    replicate_hot: Annotated[int, typer.Option(help="Extra expert copies over the workers; tokens split between copies.")] = 0,
    expert_map: Annotated[
        Optional[str], typer.Option(help="JSON expert map: which worker holds which experts (plan --emit writes one).")
    ] = None,
    expert_dtype: Annotated[Optional[ExpertDType], typer.Option(help="int8: weight-only int8 experts.")] = None,
) -> None:
    """Bring the cluster up on Ray (local, or RAY_ADDRESS) and generate for one prompt."""
    with user_errors():
        request = prepare_generation(
            checkpoint,
            prompt=prompt,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            ignore_eos=ignore_eos,
            dtype=dtype,
            strategy=strategy,
            experts_per_worker=experts_per_worker,
            replicate_hot=replicate_hot,
            expert_map=expert_map,
            expert_dtype=expert_dtype,
        )
        result = run_generation(request)
    if as_json:
        print(json.dumps(result))
    else:
        print(result["text"])


def prepare_generation(checkpoint: str, *, prompt: str | None, prompt_ids: str | None, **options: Any) -> dict[str, Any]:
    """Check everything the user gave before any Ray process starts; cheap checks first."""
    from mixtral.checkpoint import Checkpoint
    from mixtral.synthetic import resolve_checkpoint

    if (prompt is None) == (prompt_ids is None):
        raise UserError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    ids = parse_prompt_ids(prompt_ids) if prompt_ids is not None else None
    opened = Checkpoint.open(resolve_checkpoint(checkpoint))
    path, args = opened.path, opened.args

    from cluster.engine.sampling import SamplingParams
    from cluster.engine.scheduler import check_request
    from mixtral.tokenizer import load_tokenizer

    params = SamplingParams(
        max_tokens=options["max_tokens"],
        temperature=options["temperature"],
        top_p=options["top_p"],
        seed=options["seed"],
        ignore_eos=options["ignore_eos"],
    )
    params.validate()
    opened.reader().verify()
    tokenizer = load_tokenizer(path) if prompt is not None or _has_tokenizer(path) else None
    if ids is None:
        assert tokenizer is not None and prompt is not None  # --prompt was given, so its tokenizer was loaded
        ids = list(tokenizer(prompt).input_ids)
    check_request(ids, params, max_model_len=args.max_position_embeddings, vocab_size=args.vocab_size)
    from cluster.placement_options import resolve_expert_map

    expert_map = resolve_expert_map(
        args.num_local_experts,
        experts_per_worker=options["experts_per_worker"],
        replicate_hot=options["replicate_hot"],
        map_path=options["expert_map"],
    )
    return dict(
        checkpoint=opened,
        tokenizer=tokenizer,
        prompt_ids=ids,
        params=params,
        dtype=options["dtype"],
        strategy=options["strategy"],
        expert_map=expert_map,
        expert_dtype=options["expert_dtype"],
    )


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def run_generation(request: dict[str, Any]) -> dict[str, Any]:
    import ray

    from cluster.engine.build import EngineOptions
    from cluster.placement import bring_up
    from cluster.placement_options import PlacementOptions

    start_ray()
    cluster = bring_up(
        request["checkpoint"],
        engine=EngineOptions(dtype=request["dtype"], expert_dtype=request["expert_dtype"]),
        placement=PlacementOptions(strategy=request["strategy"], expert_map=request["expert_map"]),
    )
    try:
        [result] = ray.get(cluster.coordinator.generate.remote([request["prompt_ids"]], [request["params"]]))
        expert_load = ray.get(cluster.coordinator.expert_load.remote())
    finally:
        cluster.shutdown()
    tokenizer = request["tokenizer"]
    return {
        "token_ids": result.token_ids,
        "logprobs": result.logprobs,
        "text": tokenizer.decode(result.token_ids, skip_special_tokens=True) if tokenizer else "",
        "finish_reason": result.finish_reason,
        "expert_load": expert_load,
        "workers": [
            {
                "worker": w.worker,
                "experts": w.experts,
                "node_id": w.node_id,
                "gpu_ids": w.gpu_ids,
                "device": w.device,
                "compute_dtype": w.compute_dtype,
                "half_rows": w.half_rows,
                "packed": w.packed,
                "expert_dtype": w.expert_dtype,
                "expert_bytes": w.expert_bytes,
            }
            for w in cluster.worker_info
        ],
    }


def serve(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint directory, or a preset name made on first use.")] = "tiny",
    host: Annotated[str, typer.Option(help="HTTP address to bind; 0.0.0.0 to serve other machines.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (OpenAI-compatible API under /v1).")] = 8000,
    grpc_port: Annotated[
        int,
        typer.Option(help="gRPC port (moe.MoEService), e.g. 9000; it listens on every interface, so it needs --api-key. 0: off."),
    ] = 0,
    **settings: Any,
) -> None:
    """Serve the model over OpenAI-compatible HTTP and gRPC with Ray Serve, until Ctrl-C."""
    import signal
    import threading

    from pydantic import ValidationError

    from mixtral.checkpoint import Checkpoint
    from mixtral.synthetic import resolve_checkpoint

    with user_errors():
        try:
            serve_args = ServeArgs(checkpoint=checkpoint, **settings)
        except ValidationError as e:
            first = e.errors()[0]
            if not first["loc"]:  # a check across fields (ServeArgs' model validators)
                raise UserError(first["msg"].removeprefix("Value error, ").replace("_", "-")) from None
            raise UserError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
        keyed = serve_args.api_key is not None or serve_args.api_key_env is not None
        if not keyed and not is_loopback(host):
            raise UserError(f"--host {host} serves other machines: set --api-key (clients send 'Authorization: Bearer KEY')")
        if not keyed and grpc_port:
            raise UserError(
                "gRPC (Ray Serve's proxy) listens on every interface, whatever --host says: set --api-key to turn it on"
            )
        opened = Checkpoint.open(resolve_checkpoint(checkpoint))
        opened.reader().verify()
        from ray import serve as ray_serve

        from cluster.engine.build import check_kv_budget
        from cluster.serve.app import GRPC_SERVICER, api_key, build_app, engine_options, expert_map

        api_key(serve_args)  # an --api-key-env naming an unset variable fails here, before Ray starts
        check_kv_budget(opened.args, engine_options(serve_args))
        expert_map(serve_args, opened.args)  # so does a map that cannot serve
        start_ray()
        grpc_options = {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]} if grpc_port else None
        ray_serve.start(http_options={"host": host, "port": port}, grpc_options=grpc_options)
        ray_serve.run(build_app(serve_args), name="moe", route_prefix="/")
    grpc_note = f" and gRPC on port {grpc_port}" if grpc_port else ""
    print(f"serving {serve_args.model_name or opened.name} at http://{host}:{port}/v1{grpc_note}; Ctrl-C stops", flush=True)
    # Explicit handlers: a shell that starts us in the background sets SIGINT to ignored, and
    # SIGTERM (systemd, Kubernetes) should stop us as cleanly as Ctrl-C.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    print("stopping", file=sys.stderr)
    ray_serve.shutdown()


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def with_serve_settings(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` an option per ServeArgs field besides the checkpoint: its type (choices
    included), default and description, so the CLI and a Serve config file take the same settings."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    settings = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=field.default,
            annotation=Annotated[field.annotation, typer.Option(help=field.description)],
        )
        for name, field in ServeArgs.model_fields.items()
        if name != "checkpoint"
    ]
    command.__signature__ = signature.replace(parameters=own + settings)  # type: ignore[attr-defined]
    return command


app.command()(with_serve_settings(serve))


@app.command()
def stats(
    url: Annotated[str, typer.Argument(help="Base URL of a running `moe-cluster serve`.")] = "http://127.0.0.1:8000",
    plot: Annotated[Optional[Path], typer.Option(help="Write a layer x expert heat map PNG here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON report instead of the table.")] = False,
    api_key: Annotated[Optional[str], typer.Option(help="The server's --api-key, if it has one.")] = None,
) -> None:
    """Show how tokens spread over the experts (per layer and expert, and per worker), and the engine's state."""
    from cluster.serve.stats_view import engine_summary, fetch_engine_stats, fetch_load, load_table, plot_heatmap

    with user_errors():
        report, engine = fetch_load(url, api_key), fetch_engine_stats(url, api_key)
    print(json.dumps(report | {"engine": engine}) if as_json else f"{load_table(report)}\n\n{engine_summary(engine)}")
    if plot:
        print(f"heat map: {plot_heatmap(report, plot)}", file=sys.stderr)


experts_app = typer.Typer(help="The expert map of a running server.", no_args_is_help=True)
app.add_typer(experts_app, name="experts")


@experts_app.command("rebalance")
def rebalance(
    url: Annotated[str, typer.Argument(help="Base URL of a running `moe-cluster serve`.")] = "http://127.0.0.1:8000",
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON result.")] = False,
    api_key: Annotated[Optional[str], typer.Option(help="The server's --api-key, if it has one.")] = None,
) -> None:
    """Recompute the expert map from the load measured since the last rebalance, and apply it live.

    Within the workers' slots: serve's --replicate-hot gives them room for copies of hot experts."""
    from cluster.serve.stats_view import post_rebalance, rebalance_summary

    with user_errors():
        result = post_rebalance(url, api_key)
    print(json.dumps(result) if as_json else rebalance_summary(result))


@app.command()
def bench(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint directory, or a preset name (tiny, mini) made on first use.")],
    workload: Annotated[
        Literal["equal", "mixed"],
        typer.Option(
            help="equal: every request the same lengths, at each --concurrency. mixed: --requests requests at once, "
            "prompt and output lengths drawn (seeded) from 1/16 of --prompt-len/--output-len up to them."
        ),
    ] = "equal",
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrency levels (equal workload).")] = "1,8,64",
    prompt_len: Annotated[
        Optional[int], typer.Option(help="Prompt tokens per request; the most, for mixed. Default: 128 (equal), 512 (mixed).")
    ] = None,
    output_len: Annotated[
        Optional[int],
        typer.Option(help="Generated tokens per request (EOS ignored); the most, for mixed. Default: 64 (equal), 256 (mixed)."),
    ] = None,
    requests: Annotated[int, typer.Option(help="Requests of the mixed workload, all sent at once.")] = 64,
    baseline: Annotated[Optional[Literal["hf"]], typer.Option(help="'hf': also run transformers' generate, same run.")] = None,
    hf_batch_size: Annotated[
        Optional[int], typer.Option(help="Mixed: transformers' static batch size. Default: all requests in one batch.")
    ] = None,
    dtype: Annotated[Optional[DType], typer.Option(help="Compute dtype; default: the checkpoint's.")] = None,
    kv_cache_memory: Annotated[Optional[float], typer.Option(help="KV cache memory in GiB, as serve's.")] = None,
    experts_per_worker: Annotated[Optional[int], typer.Option(help="Experts each worker holds, as serve's.")] = None,
    replicate_hot: Annotated[int, typer.Option(help="Extra expert copies over the workers, as serve's.")] = 0,
    expert_map: Annotated[Optional[str], typer.Option(help="JSON expert map, as serve's.")] = None,
    expert_dtype: Annotated[Optional[ExpertDType], typer.Option(help="int8: weight-only int8 experts.")] = None,
    out: Annotated[Path, typer.Option(help="Directory for bench.json, bench.png and profile.json.")] = Path("bench-out"),
    repeats: Annotated[
        int,
        typer.Option(help="Runs per level on each side, taken in turn with the baseline's; the median run of each is reported."),
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Last stdout line: one JSON object with the results.")] = False,
) -> None:
    """Measure output tokens/s, TTFT and TPOT, against transformers in the same run."""
    from cluster.bench.run import BenchSpec, run_bench, summary
    from cluster.engine.build import EngineOptions, check_kv_budget
    from cluster.placement_options import resolve_expert_map
    from mixtral.checkpoint import Checkpoint
    from mixtral.synthetic import resolve_checkpoint

    mixed = workload == "mixed"
    prompt_len = prompt_len if prompt_len is not None else 512 if mixed else 128
    output_len = output_len if output_len is not None else 256 if mixed else 64
    with user_errors():
        try:
            levels = [int(c) for c in concurrency.split(",")]
        except ValueError:
            raise UserError(f"--concurrency must be comma-separated integers such as 1,8,64; got {concurrency!r}") from None
        if any(c < 1 for c in levels):
            raise UserError("--concurrency levels must be at least 1")
        if prompt_len < 1 or output_len < 2 or repeats < 1 or requests < 1 or (hf_batch_size is not None and hf_batch_size < 1):
            raise UserError(
                "--prompt-len, --requests, --hf-batch-size and --repeats must be at least 1 and --output-len at least 2"
            )
        opened = Checkpoint.open(resolve_checkpoint(checkpoint))
        context = opened.args.max_position_embeddings
        if prompt_len + output_len > context:
            raise UserError(f"--prompt-len {prompt_len} + --output-len {output_len} exceeds the model's context of {context}")
        check_kv_budget(opened.args, EngineOptions(dtype=dtype, kv_cache_memory_gb=kv_cache_memory))
        the_map = resolve_expert_map(
            opened.args.num_local_experts, experts_per_worker=experts_per_worker, replicate_hot=replicate_hot, map_path=expert_map
        )
        opened.reader().verify()
        start_ray()
        report = run_bench(
            BenchSpec(
                checkpoint=opened,
                dtype=dtype or opened.args.dtype,
                concurrency=levels,
                prompt_len=prompt_len,
                output_len=output_len,
                baseline=baseline == "hf",
                out=out,
                repeats=repeats,
                workload=workload,
                requests=requests,
                hf_batch_size=hf_batch_size,
                kv_cache_memory_gb=kv_cache_memory,
                expert_map=the_map,
                expert_dtype=expert_dtype,
            )
        )
    print(summary(report))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}", file=sys.stderr)
    if as_json:
        print(json.dumps({"results": report["results"], "machine": report["machine"]}))


@app.command()
def agreement(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint directory, or a preset name (tiny, mini) made on first use.")],
    expert_dtype: Annotated[ExpertDType, typer.Option(help="The expert weights' format to compare with float.")] = "int8",
    dtype: Annotated[DType, typer.Option(help="Compute dtype of both runs.")] = "float32",
    prompts: Annotated[int, typer.Option(help="Random prompts, generated together.")] = 16,
    prompt_len: Annotated[int, typer.Option(help="Tokens per prompt.")] = 32,
    max_tokens: Annotated[int, typer.Option(help="Greedy tokens per prompt.")] = 64,
) -> None:
    """How often int8 experts give the same greedy tokens as float ones (both in this process)."""
    from cluster.bench.agreement import greedy_agreement
    from mixtral.checkpoint import Checkpoint
    from mixtral.synthetic import resolve_checkpoint

    with user_errors():
        if min(prompts, prompt_len, max_tokens) < 1:
            raise UserError("--prompts, --prompt-len and --max-tokens must be at least 1")
        opened = Checkpoint.open(resolve_checkpoint(checkpoint))
        if prompt_len + max_tokens > opened.args.max_position_embeddings:
            raise UserError(f"--prompt-len + --max-tokens exceeds the model's context of {opened.args.max_position_embeddings}")
        result = greedy_agreement(
            opened, expert_dtype=expert_dtype, dtype=dtype, prompts=prompts, prompt_len=prompt_len, max_tokens=max_tokens
        )
    print(result.summary(opened.name, expert_dtype))


@app.command()
def plan(
    model: Annotated[
        str, typer.Option(help="A named shape (mixtral-8x7b, mini, tiny) or a checkpoint directory.")
    ] = "mixtral-8x7b",
    gpu: Annotated[str, typer.Option(help="GPU type from the table (see --gpus-file to add your own).")] = "L4",
    gpus_file: Annotated[Optional[Path], typer.Option(help="JSON list of extra GPU types.")] = None,
    interconnect: Annotated[str, typer.Option(help="pcie4, nvlink, ethernet-25g or ethernet-100g.")] = "pcie4",
    requests_per_s: Annotated[float, typer.Option(help="Workload: requests per second.")] = 1.0,
    prompt_len: Annotated[int, typer.Option(help="Workload: prompt tokens per request.")] = 512,
    output_len: Annotated[int, typer.Option(help="Workload: output tokens per request.")] = 256,
    ttft_ms: Annotated[float, typer.Option(help="Target time to first token.")] = 2000.0,
    tpot_ms: Annotated[float, typer.Option(help="Target time per output token.")] = 100.0,
    skew: Annotated[float, typer.Option(help="Expert load max/mean (Mixtral paper: ~1.2 on text, ~1.5 on maths).")] = 1.2,
    trace: Annotated[Optional[Path], typer.Option(help="A routing trace: its measured skew replaces --skew.")] = None,
    dtype: Annotated[DType, typer.Option(help="Weights dtype.")] = "bfloat16",
    expert_dtype: Annotated[Optional[ExpertDType], typer.Option(help="int8: weight-only int8 experts (1 byte a weight).")] = None,
    max_experts_per_gpu: Annotated[
        Optional[int], typer.Option(help="Most experts one GPU holds; default: as many as its memory takes.")
    ] = None,
    cpu_experts: Annotated[int, typer.Option(help="Experts held by a CPU worker instead of GPUs (the last ones).")] = 0,
    replicate_hot: Annotated[int, typer.Option(help="Spare expert copies on the GPUs, for rebalancing to give hot experts.")] = 0,
    profile: Annotated[Optional[Path], typer.Option(help="A bench profile.json: predict bench on that machine instead.")] = None,
    concurrency: Annotated[str, typer.Option(help="With --profile: concurrency levels to predict.")] = "1,8,64",
    plot: Annotated[Optional[Path], typer.Option(help="Write a cost plot PNG here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Last stdout line: one JSON object.")] = False,
    emit: Annotated[
        Optional[Path],
        typer.Option(help="Write the expert-parallel plan here as deploy files: Serve config, Ray cluster launcher, RayService."),
    ] = None,
    max_replicas: Annotated[
        Optional[int], typer.Option(help="With --emit: most replicas under load (default: twice the plan's).")
    ] = None,
    checkpoint_path: Annotated[
        Optional[str],
        typer.Option(help="With --emit: the checkpoint's directory on every node (default: /home/ray/models/MODEL)."),
    ] = None,
    image: Annotated[
        str, typer.Option(help="With --emit: the container image KubeRay runs (deploy/Dockerfile builds one).")
    ] = "moe-cluster:latest",
) -> None:
    """Plan GPUs, latency and cost for a workload; or, with --profile, predict bench on the profiled machine."""
    from cluster.planning import hardware
    from cluster.planning.planner import ExpertOptions, Workload, model_args
    from cluster.planning.planner import plan as make_plan
    from cluster.planning.report import plan_table, plot_costs
    from mixtral.config import load_args

    with user_errors():
        args = load_args(model) if Path(model).is_dir() else model_args(model)
        if profile is not None:
            return predict_cmd(args, profile, concurrency, prompt_len, output_len, skew, as_json)
        if min(requests_per_s, ttft_ms, tpot_ms) <= 0 or min(prompt_len, output_len) < 1 or skew < 1:
            raise UserError("requests-per-s, ttft-ms and tpot-ms must be positive, lengths at least 1, skew at least 1")
        if (max_experts_per_gpu is not None and max_experts_per_gpu < 1) or cpu_experts < 0 or replicate_hot < 0:
            raise UserError("--max-experts-per-gpu must be at least 1, --cpu-experts and --replicate-hot at least 0")
        if trace is not None:
            from router.trace import read_trace

            skew = read_trace(trace).skew()
        plans = make_plan(
            args,
            hardware.gpu(gpu, hardware.load_gpus(gpus_file)),
            hardware.interconnect(interconnect),
            Workload(requests_per_s, prompt_len, output_len, ttft_ms, tpot_ms),
            bytes_per_param=4 if dtype == "float32" else 2,
            skew=skew,
            name=Path(model).name,
            experts=ExpertOptions(
                int8=expert_dtype == "int8",
                max_experts_per_gpu=max_experts_per_gpu,
                cpu_experts=cpu_experts,
                hot_copies=replicate_hot,
            ),
        )
    print(plan_table(plans))
    if emit is not None:
        from cluster.planning.emit import deploy_spec, write_files

        with user_errors():
            if max_replicas is not None and max_replicas < 1:
                raise UserError("--max-replicas must be at least 1")
            spec = deploy_spec(
                plans[0],
                model=Path(model).name,
                experts=args.num_local_experts,
                context_length=args.context_length(None),
                plan_context=prompt_len + output_len,
                max_replicas=max_replicas,
                checkpoint_path=checkpoint_path,
                image=image,
            )
            for path in write_files(spec, emit):
                print(f"wrote {path}", file=sys.stderr)
    if plot:
        print(f"cost plot: {plot_costs(plans, plot)}", file=sys.stderr)
    if as_json:
        print(json.dumps({"skew": skew, "plans": [p.to_dict() for p in plans]}))


@app.command()
def experiments(
    model: Annotated[str, typer.Option(help="A named shape or a checkpoint directory.")] = "mixtral-8x7b",
    gpus: Annotated[str, typer.Option(help="Comma-separated GPU types.")] = "L4,A10G,RTX4090,A100-80GB,H100-80GB",
    skews: Annotated[str, typer.Option(help="Comma-separated expert load skews (max/mean).")] = "1.0,1.2,1.5",
    batches: Annotated[str, typer.Option(help="Comma-separated decode batches.")] = "1,8,32,128",
    context: Annotated[int, typer.Option(help="Tokens per sequence (prompt + output).")] = 768,
    interconnect: Annotated[str, typer.Option(help="pcie4, nvlink, ethernet-25g or ethernet-100g.")] = "pcie4",
    out: Annotated[Path, typer.Option(help="Directory for experiments.md and experiments.png.")] = Path("experiments-out"),
) -> None:
    """Sweep plans over GPU types x skew x batch; write a Markdown table and a plot."""
    from cluster.planning import hardware
    from cluster.planning.experiments import markdown, sweep
    from cluster.planning.experiments import plot as plot_sweep
    from cluster.planning.planner import model_args
    from mixtral.config import load_args

    with user_errors():
        try:
            skew_list, batch_list = [float(x) for x in skews.split(",")], [int(x) for x in batches.split(",")]
        except ValueError:
            raise UserError("--skews takes numbers like 1.0,1.2 and --batches integers like 1,8,32") from None
        if min(skew_list) < 1 or min(batch_list) < 1:
            raise UserError("skews must be at least 1 and batches at least 1")
        table = hardware.load_gpus(None)
        args = load_args(model) if Path(model).is_dir() else model_args(model)
        points = sweep(
            args,
            [hardware.gpu(g, table) for g in gpus.split(",")],
            hardware.interconnect(interconnect),
            skews=skew_list,
            batches=batch_list,
            context=context,
        )
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(points)
    (out / "experiments.md").write_text(text + "\n")
    plot_sweep(points, out / "experiments.png", f"{Path(model).name}, bf16, {interconnect}, context {context}")
    print(text)
    print(f"wrote {out / 'experiments.md'} and {out / 'experiments.png'}", file=sys.stderr)


def predict_cmd(
    args: Any, profile_path: Path, concurrency: str, prompt_len: int, output_len: int, skew: float, as_json: bool
) -> None:
    """Predicted bench tokens/s on the profiled machine, beside what bench measured there if bench.json is with it."""
    from cluster.planning.local import predict_bench_tok_s
    from cluster.planning.profile import Profile

    if not profile_path.is_file():
        raise UserError(f"--profile {profile_path} does not exist; `moe-cluster bench` writes one into its --out directory")
    prof = Profile.load(profile_path)
    measured: dict[int, float] = {}
    bench_file = profile_path.with_name("bench.json")
    if bench_file.is_file():
        report = json.loads(bench_file.read_text())
        if (report["prompt_len"], report["output_len"]) == (prompt_len, output_len):
            measured = {r["concurrency"]: r["tok_s"] for r in report["results"]}
    rows = []
    for c in (int(x) for x in concurrency.split(",")):
        predicted = predict_bench_tok_s(args, prof, concurrency=c, prompt_len=prompt_len, output_len=output_len, skew=skew)
        m = measured.get(c)
        extra = f", measured {m:.1f} ({100 * (predicted / m - 1):+.0f}%)" if m else ""
        print(f"concurrency {c}: predicted {predicted:.1f} tok/s{extra}")
        rows.append({"concurrency": c, "predicted_tok_s": predicted, "measured_tok_s": m})
    if as_json:
        print(json.dumps({"predictions": rows}))


def main() -> None:
    """Usage mistakes (a wrong choice, a missing argument) as one line, like every other user error."""
    try:
        code = app(standalone_mode=False)
    except Exception as e:
        # click's usage errors (typer vendors click, so they are matched by what they carry).
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":
            if e.format_message():  # the help text, unless typer's rich formatter printed it already
                print(e.format_message(), file=sys.stderr)
        else:
            ctx = getattr(e, "ctx", None)
            print(
                f"moe-cluster: error: {e.format_message()} (see `{ctx.command_path if ctx else 'moe-cluster'} --help`)",
                file=sys.stderr,
            )
        code = e.exit_code
    sys.exit(code if isinstance(code, int) else 0)
