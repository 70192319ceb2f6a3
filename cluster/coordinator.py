"""The coordinator: everything of the model that is not an expert, plus the KV cache.

Per step, for the whole running batch (T new tokens over B sequences):

    x = embed(tokens)                                     # [T, D]
    for each layer l:
        h = x + attention_l(rms_norm(x), kv_cache)        # GQA, RoPE, sliding window
        m = rms_norm2(h)
        plan = route(gate_l(m), k)                        # [Router]
        x = h + moe_layer(l, m, plan, transport)          # [Dispatch] -> [Experts] -> [Combine]
    logits = lm_head(rms_norm(x[last token of each sequence]))   # [B, V]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.attention import AttentionWeights, attention
from cluster.kv_cache import KVCache
from cluster.layout import build_layout
from mixtral import names
from mixtral.checkpoint import CheckpointReader, ReadLog
from mixtral.config import MixtralArgs, load_args, resolve_dtype
from mixtral.layers import rms_norm, rope_cos_sin
from mixtral.telemetry import Telemetry
from router.load import ExpertLoad, balancedness
from router.moe import moe_layer
from router.routing import RoutingPlan, route
from router.trace import TraceWriter
from router.transport import ExpertTransport


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # [D]
    attn: AttentionWeights
    post_attention_norm: torch.Tensor  # [D]
    gate: torch.Tensor  # [E, D] router


def non_expert_weights(args: MixtralArgs) -> list[str]:
    per_layer = [*names.ATTENTION, *names.NORMS, names.GATE]
    tensors = [names.EMBED, names.FINAL_NORM] + [
        names.layer_weight(layer, suffix) for layer in range(args.num_hidden_layers) for suffix in per_layer
    ]
    return tensors if args.tie_word_embeddings else tensors + [names.LM_HEAD]


class Coordinator:
    def __init__(
        self,
        checkpoint: str | Path,
        transport: ExpertTransport,
        *,
        dtype: str | None = None,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        device: str = "cpu",
        trace: TraceWriter | None = None,
    ) -> None:
        self.args = args = load_args(checkpoint)
        self.dtype = resolve_dtype(args, dtype)
        self.device = device
        self.transport = transport
        self.vocab_size = args.vocab_size
        self.max_model_len = min(max_model_len or args.max_position_embeddings, args.max_position_embeddings)
        self.reader = CheckpointReader(checkpoint)
        w = dict(self.reader.read(non_expert_weights(args), dtype=self.dtype, device=device))
        self.embed = w[names.EMBED]  # [V, D]
        self.final_norm = w[names.FINAL_NORM]
        self.lm_head = w[names.EMBED] if args.tie_word_embeddings else w[names.LM_HEAD]
        self.layers = [self._layer(w, layer) for layer in range(args.num_hidden_layers)]
        capacity = min(args.sliding_window or self.max_model_len, self.max_model_len)
        self.cache = KVCache(
            num_layers=args.num_hidden_layers, num_slots=max_num_seqs, num_kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim, max_capacity=capacity, dtype=self.dtype, device=device,
        )
        self.load = ExpertLoad(args.num_hidden_layers, args.num_local_experts, args.num_experts_per_tok)
        self.telemetry = Telemetry(Path(checkpoint).name)  # the same model label as the workers'.
        self.trace = trace

    @staticmethod
    def _layer(w: dict[str, torch.Tensor], layer: int) -> LayerWeights:
        def get(suffix: str) -> torch.Tensor:
            return w[names.layer_weight(layer, suffix)]

        q, k, v, o = (get(s) for s in names.ATTENTION)
        return LayerWeights(
            input_norm=get("input_layernorm"),
            attn=AttentionWeights(wq=q, wk=k, wv=v, wo=o),
            post_attention_norm=get("post_attention_layernorm"),
            gate=get(names.GATE),
        )

    @torch.inference_mode()
    def forward(self, tokens: list[list[int]], *, slots: list[int], starts: list[int]) -> torch.Tensor:
        """Run one step: sequence b feeds tokens[b] at positions starts[b].. into cache slot slots[b].

        Returns float32 logits [B, V] of each sequence's last new token.
        """
        args = self.args
        lengths = [len(t) for t in tokens]
        self.cache.reserve(max(s + n for s, n in zip(starts, lengths)))
        layout = build_layout(
            slots=slots, starts=starts, lengths=lengths, capacity=self.cache.capacity,
            window=args.sliding_window, dtype=self.dtype,
        )
        rope = rope_cos_sin(layout.positions, head_dim=args.head_dim, theta=args.rope_theta, dtype=self.dtype)
        flat = torch.tensor([t for seq in tokens for t in seq], device=self.device)
        x = self.embed[flat]  # [T, D]
        for i, lw in enumerate(self.layers):
            h = x + attention(
                rms_norm(x, lw.input_norm, args.rms_norm_eps), lw.attn, layout, self.cache.k[i], self.cache.v[i], rope,
                num_heads=args.num_attention_heads, num_kv_heads=args.num_key_value_heads, head_dim=args.head_dim,
            )
            m = rms_norm(h, lw.post_attention_norm, args.rms_norm_eps)
            plan = route(F.linear(m, lw.gate), args.num_experts_per_tok)  # gate logits [T, E]
            start = time.perf_counter()
            x = h + moe_layer(i, m, plan, self.transport)
            self._record_routing(i, plan, time.perf_counter() - start)
        if self.trace:
            self.trace.end_step()
        last = rms_norm(x[layout.last_token], self.final_norm, args.rms_norm_eps)  # [B, D]
        return F.linear(last, self.lm_head).float()

    def _record_routing(self, layer: int, plan: RoutingPlan, seconds: float) -> None:
        self.load.record(layer, plan.counts, entropy_sum=plan.entropy_sum, dispatch_seconds=seconds)
        if self.trace:
            self.trace.record(layer, plan.topk_ids)
        t = self.telemetry
        for expert, count in enumerate(plan.counts):
            t.inc("moe_expert_tokens", count, layer=layer, expert=expert)
        t.observe("moe_dispatch_round_trip_seconds", seconds, layer=layer)
        t.set("moe_expert_balancedness", balancedness(self.load.total[layer]), layer=layer)
        t.set("moe_router_entropy", self.load.entropy_sum[layer] / max(1, self.load.tokens[layer]), layer=layer)

    def read_log(self) -> ReadLog:
        return self.reader.log
