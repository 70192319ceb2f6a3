"""`moe-cluster generate` and `make-checkpoint`: one prompt through a cluster brought up here, and test checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.cli.options import comma_separated, command, start_ray
from cluster.cli.root import app
from cluster.placement_options import Strategy
from mixtral.config import DType, DTypeChoice, ExpertDType, chosen_dtype
from mixtral.presets import WRITABLE

CHECKPOINT_HELP = "Checkpoint directory, a preset name (tiny, mini) made on first use, or a Hugging Face repo id."


class MakeCheckpointArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="Directory to write (must not exist or be empty).")
    preset: str = Field("tiny", description=f"Model shape: {', '.join(WRITABLE)}.")
    seed: int = Field(0, description="Seed of the random weights.")
    dtype: DType = Field("float32", description="Weights dtype.")

    @field_validator("preset")
    @classmethod
    def _known(cls, preset: str) -> str:
        if preset not in WRITABLE:
            raise ValueError(f"must be one of {', '.join(WRITABLE)}; got {preset!r}")
        return preset


@command(app, MakeCheckpointArgs, name="make-checkpoint", arguments=("out",))
def make_checkpoint(args: MakeCheckpointArgs) -> None:
    """Write a random-weight Mixtral checkpoint with transformers' save_pretrained, plus the tokenizer."""
    from mixtral.synthetic import make_checkpoint as write

    print(write(args.out, preset_name=args.preset, seed=args.seed, dtype=args.dtype))


class GenerateArgs(BaseModel):
    """The sampling fields are checked where every request's are (cluster.engine.sampling), not here."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description=CHECKPOINT_HELP)
    prompt: str | None = Field(None, description="Text prompt, tokenized with BOS.")
    prompt_ids: Annotated[list[int] | None, comma_separated(int, "1,2,3", at_least=0)] = Field(
        None, description="Token ids used verbatim, e.g. 1,2,3 (no BOS added)."
    )
    max_tokens: int = Field(32, description="Tokens to generate (at least 1).")
    temperature: float = Field(0.0, description="0 is greedy.")
    top_p: float = Field(1.0, description="Nucleus sampling mass, in (0, 1].")
    seed: int | None = Field(None, description="Sampling seed.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS.", json_schema_extra={"flags": ["--ignore-eos"]})
    as_json: bool = Field(False, description="Last stdout line: one JSON object.", json_schema_extra={"flags": ["--json"]})
    dtype: DTypeChoice = Field("auto", description="Compute dtype; auto: the checkpoint's.")
    strategy: Strategy = Field("PACK", description="Placement strategy of the placement group.")
    experts_per_worker: int | None = Field(
        None, ge=1, description="Experts each worker holds (one call per worker and layer); default 1."
    )
    replicate_hot: int = Field(0, ge=0, description="Extra expert copies over the workers; tokens split between copies.")
    expert_map: str | None = Field(
        None, description="JSON expert map: which worker holds which experts (plan --emit writes one)."
    )
    expert_dtype: ExpertDType | None = Field(None, description="int8: weight-only int8 experts.")

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateArgs:
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
        return self


@command(app, GenerateArgs, arguments=("checkpoint",))
def generate(args: GenerateArgs) -> None:
    """Bring the cluster up on Ray (local, or RAY_ADDRESS) and generate for one prompt."""
    result = run_generation(prepare_generation(args))
    print(json.dumps(result) if args.as_json else result["text"])


def prepare_generation(args: GenerateArgs) -> dict[str, Any]:
    """Check everything the user gave before any Ray process starts; cheap checks first."""
    from cluster.engine.build import EngineOptions, check_dense_options
    from cluster.engine.sampling import SamplingParams
    from cluster.engine.scheduler import check_request
    from cluster.placement_options import resolve_expert_map
    from mixtral.synthetic import open_checkpoint
    from mixtral.tokenizer import load_tokenizer

    opened = open_checkpoint(args.checkpoint)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos
    )
    params.validate()
    opened.reader().verify()
    tokenizer = load_tokenizer(opened.path) if args.prompt is not None or has_tokenizer(opened.path) else None
    ids = args.prompt_ids if args.prompt_ids is not None else prompt_token_ids(args.prompt, tokenizer)
    check_request(ids, params, max_model_len=opened.args.max_position_embeddings, vocab_size=opened.args.vocab_size)
    expert_map = resolve_expert_map(
        opened.args.num_local_experts,
        experts_per_worker=args.experts_per_worker,
        replicate_hot=args.replicate_hot,
        map_path=args.expert_map,
        dense=None if opened.args.is_moe else opened.name,
    )
    check_dense_options(opened.args, EngineOptions(expert_dtype=args.expert_dtype), name=opened.name)
    return dict(
        checkpoint=opened,
        tokenizer=tokenizer,
        prompt_ids=ids,
        params=params,
        dtype=chosen_dtype(args.dtype),
        strategy=args.strategy,
        expert_map=expert_map,
        expert_dtype=args.expert_dtype,
    )


def prompt_token_ids(prompt: str | None, tokenizer: Any) -> list[int]:
    assert prompt is not None and tokenizer is not None  # --prompt was given, so its tokenizer was loaded
    return list(tokenizer(prompt).input_ids)


def has_tokenizer(path: Path) -> bool:
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
        moe = request["checkpoint"].args.is_moe
        expert_load = ray.get(cluster.coordinator.expert_load.remote()) if moe else None
    finally:
        cluster.shutdown()
    tokenizer = request["tokenizer"]
    return {
        "token_ids": result.token_ids,
        "logprobs": result.logprobs,
        "text": tokenizer.decode(result.token_ids, skip_special_tokens=True) if tokenizer else "",
        "finish_reason": result.finish_reason,
        "expert_load": expert_load,  # None: a dense model, no experts
        "workers": [worker_row(w) for w in cluster.worker_info],
    }


def worker_row(info: Any) -> dict[str, Any]:
    fields = ("worker", "experts", "node_id", "gpu_ids", "device", "compute_dtype", "half_rows", "packed")
    return {f: getattr(info, f) for f in fields} | {"expert_dtype": info.expert_dtype, "expert_bytes": info.expert_bytes}
