"""`moe-cluster bench` and `agreement`: measurements on this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.cli.generate import CHECKPOINT_HELP
from cluster.cli.options import Levels, command, start_ray
from cluster.cli.root import app
from cluster.errors import UserError
from mixtral.config import DType, DTypeChoice, ExpertDType, chosen_dtype


class BenchArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description=CHECKPOINT_HELP)
    workload: Literal["equal", "mixed"] = Field(
        "equal",
        description="equal: every request the same lengths, at each --concurrency. mixed: --requests requests at once, "
        "prompt and output lengths drawn (seeded) from 1/16 of --prompt-len/--output-len up to them.",
    )
    concurrency: Levels = Field([1, 8, 64], description="Comma-separated concurrency levels (equal workload).")
    prompt_len: int | None = Field(
        None, ge=1, description="Prompt tokens per request; the most, for mixed. Default: 128 (equal), 512 (mixed)."
    )
    output_len: int | None = Field(
        None,
        ge=2,
        description="Generated tokens per request (EOS ignored); the most, for mixed. Default: 64 (equal), 256 (mixed).",
    )
    requests: int = Field(64, ge=1, description="Requests of the mixed workload, all sent at once.")
    baseline: Literal["hf", "llamacpp", "hf,llamacpp"] | None = Field(
        None,
        description="Also run, same run: 'hf' transformers' generate; 'llamacpp' llama.cpp on the checkpoint as GGUF "
        "(the llamacpp extra; at concurrency 1, tokens checked equal first); 'hf,llamacpp' both.",
    )
    hf_batch_size: int | None = Field(
        None, ge=1, description="Mixed: transformers' static batch size. Default: all requests in one batch."
    )
    dtype: DTypeChoice = Field("auto", description="Compute dtype; auto: the checkpoint's.")
    kv_cache_memory: float | None = Field(None, gt=0, description="KV cache memory in GiB, as serve's.")
    experts_per_worker: int | None = Field(None, ge=1, description="Experts each worker holds, as serve's.")
    replicate_hot: int = Field(0, ge=0, description="Extra expert copies over the workers, as serve's.")
    expert_map: str | None = Field(None, description="JSON expert map, as serve's.")
    expert_dtype: ExpertDType | None = Field(None, description="int8: weight-only int8 experts.")
    out: Path = Field(Path("bench-out"), description="Directory for bench.json, bench.png and profile.json.")
    repeats: int = Field(
        1, ge=1, description="Runs per level on each side, taken in turn with the baseline's; the median run of each is reported."
    )
    as_json: bool = Field(
        False, description="Last stdout line: one JSON object with the results.", json_schema_extra={"flags": ["--json"]}
    )
    breakdown: bool = Field(
        False,
        description="Also print where a step's time goes at each level (schedule, attention, dispatch, wait, combine, "
        "head, sampling: ms per step); bench.json has it either way.",
    )

    @model_validator(mode="after")
    def _lengths(self) -> BenchArgs:
        mixed = self.workload == "mixed"
        self.prompt_len = self.prompt_len or (512 if mixed else 128)
        self.output_len = self.output_len or (256 if mixed else 64)
        if self.baseline and "llamacpp" in self.baseline and (mixed or 1 not in self.concurrency):
            raise ValueError(
                "--baseline llamacpp measures llama.cpp at concurrency 1 of the equal workload (it decodes one "
                "sequence here): include 1 in --concurrency"
            )
        return self


@command(app, BenchArgs, arguments=("checkpoint",))
def bench(args: BenchArgs) -> None:
    """Measure output tokens/s, TTFT and TPOT, against transformers in the same run."""
    from cluster.bench.run import BenchSpec, run_bench, summary
    from cluster.engine.build import EngineOptions, check_kv_budget
    from cluster.placement_options import resolve_expert_map
    from mixtral.synthetic import open_checkpoint

    assert args.prompt_len is not None and args.output_len is not None  # BenchArgs fills them in
    opened = open_checkpoint(args.checkpoint)
    context = opened.args.max_position_embeddings
    if args.prompt_len + args.output_len > context:
        raise UserError(
            f"--prompt-len {args.prompt_len} + --output-len {args.output_len} exceeds the model's context of {context}"
        )
    dtype = chosen_dtype(args.dtype)
    check_kv_budget(opened.args, EngineOptions(dtype=dtype, kv_cache_memory_gb=args.kv_cache_memory))
    the_map = resolve_expert_map(
        opened.args.num_local_experts,
        experts_per_worker=args.experts_per_worker,
        replicate_hot=args.replicate_hot,
        map_path=args.expert_map,
    )
    if not opened.args.is_moe:
        raise UserError(
            f"{opened.name} is a dense model: bench measures the expert-parallel engine (its dispatch, experts and "
            "workers); serve the dense model and measure it as a client would"
        )
    opened.reader().verify()
    if args.baseline and "llamacpp" in args.baseline:
        from cluster.bench.llamacpp import MISSING, available

        if not available():
            raise UserError(MISSING)  # before Ray starts and the cluster comes up
    start_ray()
    report = run_bench(
        BenchSpec(
            checkpoint=opened,
            dtype=dtype or opened.args.dtype,
            concurrency=args.concurrency,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            baseline="hf" in (args.baseline or ""),
            llamacpp="llamacpp" in (args.baseline or ""),
            breakdown=args.breakdown,
            out=args.out,
            repeats=args.repeats,
            workload=args.workload,
            requests=args.requests,
            hf_batch_size=args.hf_batch_size,
            kv_cache_memory_gb=args.kv_cache_memory,
            expert_map=the_map,
            expert_dtype=args.expert_dtype,
        )
    )
    print(summary(report))
    if args.breakdown and report["workload"] == "equal":
        from cluster.bench.report import breakdown_table

        print(breakdown_table(report["results"]))
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}", file=sys.stderr)
    if args.as_json:
        print(json.dumps({"results": report["results"], "machine": report["machine"]}))


class AgreementArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description=CHECKPOINT_HELP)
    expert_dtype: ExpertDType = Field("int8", description="The expert weights' format to compare with float.")
    dtype: DType = Field("float32", description="Compute dtype of both runs.")
    prompts: int = Field(16, ge=1, description="Random prompts, generated together.")
    prompt_len: int = Field(32, ge=1, description="Tokens per prompt.")
    max_tokens: int = Field(64, ge=1, description="Greedy tokens per prompt.")


@command(app, AgreementArgs, arguments=("checkpoint",))
def agreement(args: AgreementArgs) -> None:
    """How often int8 experts give the same greedy tokens as float ones (both in this process)."""
    from cluster.bench.agreement import greedy_agreement
    from mixtral.synthetic import open_checkpoint

    opened = open_checkpoint(args.checkpoint)
    if args.prompt_len + args.max_tokens > opened.args.max_position_embeddings:
        raise UserError(f"--prompt-len + --max-tokens exceeds the model's context of {opened.args.max_position_embeddings}")
    result = greedy_agreement(
        opened,
        expert_dtype=args.expert_dtype,
        dtype=args.dtype,
        prompts=args.prompts,
        prompt_len=args.prompt_len,
        max_tokens=args.max_tokens,
    )
    print(result.summary(opened.name, args.expert_dtype))
