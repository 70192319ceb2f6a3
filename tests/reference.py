"""Slow, obviously correct references that every fast or distributed path is checked against."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def reference_moe(
    x: torch.Tensor, gate: torch.Tensor, w1: list[torch.Tensor], w2: list[torch.Tensor], w3: list[torch.Tensor], top_k: int
) -> torch.Tensor:
    """Mixtral's MoE, token by token: sum over the top-k of softmax(x W_g) renormalised, of SwiGLU_e(x)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ gate.T, dim=-1)
        weights, experts = torch.topk(probs, top_k)
        for weight, e in zip(weights / weights.sum(), experts.tolist()):
            out[t] += weight * (w2[e] @ (F.silu(w1[e] @ x[t]) * (w3[e] @ x[t])))
    return out


def hf_model(checkpoint: Path) -> torch.nn.Module:
    """transformers' own model of the checkpoint's kind (MixtralForCausalLM or MistralForCausalLM), float32, eager."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by re-running transformers' full forward each step (no cache to get wrong)."""
    ids, logprobs = list(prompt), []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        token = int(torch.argmax(logits))
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        ids.append(token)
    return ids[len(prompt) :], logprobs
