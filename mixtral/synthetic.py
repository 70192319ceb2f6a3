"""Random-weight checkpoints in real Hugging Face format, written by transformers itself."""

from __future__ import annotations

import os
from pathlib import Path

from mixtral.checkpoint import Checkpoint
from mixtral.config import DTYPES
from mixtral.errors import ModelError
from mixtral.presets import preset
from mixtral.tokenizer import write_mixtral_tokenizer


def make_checkpoint(
    out: str | Path,
    *,
    preset_name: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str = "50MB",
    overrides: dict | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write a random MixtralForCausalLM (or MistralForCausalLM, for a preset of model_type mistral) with
    `save_pretrained` (sharded, with index) plus the tokenizer."""
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty; choose a new directory")
    import torch  # after the checks: a mistake is reported without loading torch and transformers
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    fields = preset(preset_name) | (overrides or {})
    rope_theta = fields.pop("rope_theta", 1e6)
    dense = fields.pop("model_type", "mixtral") == "mistral"
    config_cls, model_cls = (MistralConfig, MistralForCausalLM) if dense else (MixtralConfig, MixtralForCausalLM)
    config = config_cls(**fields, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = model_cls(config).to(getattr(torch, dtype))
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
    if tokenizer:
        write_mixtral_tokenizer(tmp)
    if out.exists():
        out.rmdir()
    try:
        tmp.rename(out)  # atomic: a half-written checkpoint never sits at `out`
    except OSError:
        if not (out / "config.json").is_file():  # else another process made it first: use theirs
            raise
    return out


def cached_preset_checkpoint(name: str, *, cache_dir: str | Path | None = None) -> Path:
    """The preset's checkpoint in the cache, made on first use."""
    root = Path(cache_dir or os.environ.get("MOE_CLUSTER_CACHE") or Path.home() / ".cache" / "moe-cluster")
    path = root / "checkpoints" / name
    if not (path / "config.json").is_file():
        root.joinpath("checkpoints").mkdir(parents=True, exist_ok=True)
        make_checkpoint(path, preset_name=name)
    return path


def open_checkpoint(checkpoint: str) -> Checkpoint:
    """A checkpoint directory; else a preset name (tiny, mini, mistral-tiny) whose checkpoint is made on first use;
    else a Hugging Face repo id (owner/name), from the Hub or its local cache (mixtral.hub)."""
    from mixtral.hub import from_hub, is_repo_id
    from mixtral.presets import WRITABLE

    path = Path(checkpoint)
    if not path.exists() and checkpoint in WRITABLE:
        return Checkpoint.open(cached_preset_checkpoint(checkpoint))
    if not path.exists() and is_repo_id(checkpoint):
        return Checkpoint.open(from_hub(checkpoint), repo_id=checkpoint)
    return Checkpoint.open(path)
