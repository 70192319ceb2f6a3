"""Model arguments parsed from a Hugging Face `config.json`: MixtralForCausalLM (model_type mixtral, the
sparse MoE) or MistralForCausalLM (model_type mistral, its dense sibling: the same attention, one SwiGLU MLP)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast, get_args

from mixtral.errors import CheckpointError, ModelError

if TYPE_CHECKING:
    import torch

# Kept as names so that checking a config (the CLI's first step) does not import torch.
DType = Literal["float32", "bfloat16", "float16"]
ExpertDType = Literal["int8"]  # what expert weights may be held in besides the compute dtype (mixtral.int8)
DTYPES: tuple[str, ...] = get_args(DType)
ModelType = Literal["mixtral", "mistral"]
MODEL_TYPES: tuple[str, ...] = get_args(ModelType)
# What a user may ask for, in vLLM's words: auto is the checkpoint's dtype, half is float16.
DTypeChoice = Literal["auto", "half", "float16", "bfloat16", "float32"]


def chosen_dtype(choice: DTypeChoice | None) -> DType | None:
    """The compute dtype a --dtype choice names; None (auto) leaves it to the checkpoint."""
    if choice is None or choice == "auto":
        return None
    return "float16" if choice == "half" else choice


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a Mixtral or Mistral model; names follow the checkpoint's config.json.

    A dense Mistral model is counted as one expert that every token takes (num_local_experts and
    num_experts_per_tok 1): its MLP is that expert's SwiGLU with weight 1, so the planner's equations
    hold for both; what runs it differs (the MLP on the coordinator's device, no expert workers)."""

    model_type: ModelType
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int | None  # None: full attention (Mixtral 8x7B); else the Mistral 7B window W
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: DType  # the checkpoint's own dtype

    @property
    def is_moe(self) -> bool:
        """Experts on workers behind a router (Mixtral); else a dense MLP beside the attention (Mistral)."""
        return self.model_type == "mixtral"

    def context_length(self, max_model_len: int | None) -> int:
        """The context served: max_model_len if given, never past max_position_embeddings."""
        return min(max_model_len or self.max_position_embeddings, self.max_position_embeddings)


def load_args(checkpoint: str | Path) -> ModelArgs:
    """Read and check `checkpoint/config.json`; raise CheckpointError saying what is wrong."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is not a directory; make one with `moe-cluster make-checkpoint {path} --preset tiny`"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing; a Hugging Face Mixtral checkpoint needs config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object")
    return args_from_dict(raw, source=str(config_file))


def args_from_dict(raw: dict, *, source: str = "config") -> ModelArgs:
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type is {model_type!r}; moe-cluster serves MixtralForCausalLM (model_type 'mixtral') "
            "and MistralForCausalLM (model_type 'mistral') checkpoints"
        )
    moe = model_type == "mixtral"
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        rope = raw.get("rope_parameters") or {}
        eos = raw.get("eos_token_id", 2)
        args = ModelArgs(
            model_type=cast(ModelType, model_type),
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            num_local_experts=int(raw["num_local_experts"]) if moe else 1,
            num_experts_per_tok=int(raw["num_experts_per_tok"]) if moe else 1,
            max_position_embeddings=int(raw["max_position_embeddings"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            # transformers 5 keeps rope_theta in rope_parameters; older configs have it at the top.
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 1e6))),
            sliding_window=int(raw["sliding_window"]) if raw.get("sliding_window") else None,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
            dtype=cast(DType, str(raw.get("dtype") or raw.get("torch_dtype") or "float32")),  # checked below
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: a field has the wrong type ({e})") from None
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope_type {rope_type!r} is not supported; only the default RoPE is")
    if args.num_attention_heads % args.num_key_value_heads:
        raise CheckpointError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
    if not 1 <= args.num_experts_per_tok <= args.num_local_experts:
        raise CheckpointError(f"{source}: num_experts_per_tok must be between 1 and num_local_experts")
    if args.dtype not in DTYPES:
        raise CheckpointError(f"{source}: dtype {args.dtype!r} is not one of {', '.join(DTYPES)}")
    return args


def resolve_dtype(args: ModelArgs, override: str | None) -> torch.dtype:
    """The compute dtype: the flag if given, else the checkpoint's own."""
    import torch

    name = override or args.dtype
    if name not in DTYPES:
        raise ModelError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)
