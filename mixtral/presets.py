"""Named model shapes (DESIGN.md, "Shapes to know"), as transformers MixtralConfig or MistralConfig fields
(model_type says which; mixtral when it is not given)."""

from __future__ import annotations

from typing import Any

from mixtral.errors import ModelError

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=4096,
        rope_theta=1e6,
    ),
    "mini": dict(
        hidden_size=1024,
        num_hidden_layers=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=3584,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=8192,
        rope_theta=1e6,
    ),
    # Planning only: 93 GB in bf16, never written here.
    "mixtral-8x7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
        rope_theta=1e6,
    ),
    # Dense, Mistral 7B's shape scaled down as tiny is Mixtral's: a window an eighth of the context.
    "mistral-tiny": dict(
        model_type="mistral",
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=896,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=4096,
        sliding_window=512,
        rope_theta=1e4,
    ),
    # Planning only: Mistral 7B (arXiv 2310.06825; v0.1's config), 14.5 GB in bf16.
    "mistral-7b": dict(
        model_type="mistral",
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
        sliding_window=4096,
        rope_theta=1e4,
    ),
}

WRITABLE = ("tiny", "mini", "mistral-tiny")


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ModelError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
