"""A checkpoint whose routers favour one expert: about three times its share of the routed tokens.

One hidden dimension is made nearly constant over the residual stream (the embeddings carry it),
and each router's row for the favoured expert reads that dimension: a bias on that expert's logit
in every layer, inside an ordinary Mixtral checkpoint written with transformers' save_pretrained.
"""

from __future__ import annotations

from pathlib import Path

import torch

FEATURE = 0  # the hidden dimension made constant
LEVEL = 0.03  # its value in every embedding (the others' spread is about 0.02)
BIAS = 0.27  # the favoured expert's router weight on it: about 3/8 of the routed pairs for 8 experts, top-2


def biased_checkpoint(base: Path, out: Path, *, expert: int = 0) -> Path:
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, FEATURE] = LEVEL
        for layer in model.model.layers:
            layer.mlp.gate.weight[:, FEATURE] = 0.0
            layer.mlp.gate.weight[expert, FEATURE] = BIAS
    model.save_pretrained(str(out), max_shard_size="300KB")
    return out
