"""Tokenizers: a checkpoint's own files, and the real Mixtral tokenizer for made checkpoints."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mixtral.errors import CheckpointError


def mixtral_sentencepiece_model() -> Path:
    """The Mixtral 8x7B SentencePiece model (v1, vocab 32000) that ships in mistral-common."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def write_mixtral_tokenizer(out: Path) -> None:
    """Write tokenizer.model, tokenizer.json and tokenizer_config.json as a Mixtral repo has them."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(mixtral_sentencepiece_model(), Path(tmp) / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
        }
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        AutoTokenizer.from_pretrained(tmp).save_pretrained(str(out))
    shutil.copy(mixtral_sentencepiece_model(), out / "tokenizer.model")


def load_tokenizer(checkpoint: str | Path) -> Any:
    """The checkpoint's own tokenizer, through transformers' AutoTokenizer."""
    from transformers import AutoTokenizer

    root = Path(checkpoint)
    if not any((root / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"{root} has no tokenizer files; pass --prompt-ids, or add tokenizer.json / tokenizer.model")
    try:
        return AutoTokenizer.from_pretrained(str(root))
    except Exception as e:  # transformers raises many kinds for a broken tokenizer
        raise CheckpointError(f"{root}: the tokenizer could not be loaded ({type(e).__name__}: {e})") from None
