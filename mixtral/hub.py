"""Checkpoints named by a Hugging Face repo id: downloaded when the Hub can be reached, else from its local cache."""

from __future__ import annotations

import re
from pathlib import Path

from mixtral.errors import CheckpointError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hub spells them
# What the model needs: config, sharded weights with their index, tokenizer. Not the repo's other
# copies of the weights (consolidated.safetensors, *.pt), which would double the download.
PATTERNS = ["*.json", "model*.safetensors", "tokenizer*"]


def is_repo_id(text: str) -> bool:
    return REPO_ID.fullmatch(text) is not None and not text.startswith(".")


def from_hub(repo_id: str) -> Path:
    """The checkpoint's directory in the local Hugging Face cache, downloaded first where the Hub can be
    reached (HF_TOKEN for gated repos; HF_HUB_OFFLINE=1 never tries); CheckpointError where neither has it."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=PATTERNS))
    except Exception as online:  # offline, unknown or gated repo: the cache may still have it
        reason = str(online).splitlines()[0] if str(online) else type(online).__name__
    try:
        return Path(snapshot_download(repo_id, allow_patterns=PATTERNS, local_files_only=True))
    except Exception:
        raise CheckpointError(
            f"{repo_id!r} is not a local directory, and as a Hugging Face repo id it could not be downloaded "
            f"({reason}) nor found in the local cache: give a checkpoint directory, or fetch the repo where the Hub "
            "can be reached (`huggingface-cli download`, with HF_TOKEN set for gated models)"
        ) from None
