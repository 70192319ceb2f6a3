"""Tensor names in a Hugging Face Mixtral or Mistral checkpoint (as `save_pretrained` writes them)."""

from __future__ import annotations

EXPERT_MARKER = ".block_sparse_moe.experts."


def expert_weight(layer: int, expert: int, w: str) -> str:
    """w is one of w1 (gate), w2 (down), w3 (up): SwiGLU_e(x) = w2(silu(w1 x) * w3 x)."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


def expert_weights(num_layers: int, expert: int) -> list[str]:
    return [expert_weight(layer, expert, w) for layer in range(num_layers) for w in ("w1", "w2", "w3")]


def is_expert_weight(name: str) -> bool:
    return EXPERT_MARKER in name


def layer_weight(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}.weight"


EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
GATE = "block_sparse_moe.gate"  # Mixtral's router
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # Mistral's dense SwiGLU: down(silu(gate x) * up x)


def feed_forward_weights(layer: int, *, moe: bool) -> list[str]:
    """What the coordinator reads of a layer's feed-forward: Mixtral's router (its experts are the
    workers'), or Mistral's whole MLP."""
    return [layer_weight(layer, GATE)] if moe else [layer_weight(layer, suffix) for suffix in MLP]
