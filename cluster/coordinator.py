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

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.attention import AttentionWeights, attention
from cluster.kv_cache import KVCache
from cluster.layout import StepLayout, build_layout
from mixtral import names
from mixtral.checkpoint import CheckpointReader, ReadLog
from mixtral.config import MixtralArgs, load_args, resolve_dtype
from mixtral.layers import rms_norm, rope_cos_sin
from mixtral.telemetry import Telemetry
from router.load import ExpertLoad, balancedness
from router.moe import MoeCall, finish_moe, start_moe
from router.routing import RoutingPlan, route
from router.trace import TraceWriter
from router.transport import ExpertTransport


@dataclass(frozen=True)
class AttentionGroup:
    """Consecutive sequences of a micro-batch that share one padded attention grid."""

    tokens: slice  # their new tokens, within the micro-batch's flat [T]
    layout: StepLayout
    rope: tuple[torch.Tensor, torch.Tensor]


@dataclass
class MicroBatch:
    """Part of a step's sequences, carried through the layers together."""

    groups: list[AttentionGroup]
    last_token: torch.Tensor  # [B] flat index of each sequence's last new token
    x: torch.Tensor  # [T, D] residual stream
    h: torch.Tensor | None = None  # [T, D] after this layer's attention
    call: MoeCall | None = None  # this layer's MoE in flight


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


def attention_groups(lengths: list[int], starts: list[int]) -> list[slice]:
    """Runs of consecutive sequences of one kind: decoding (one new token), starting a prompt
    (nothing cached), or continuing one.

    One padded grid for a whole mixed step would pad every decode to the longest prompt chunk
    and give every fresh prompt the cache columns of the longest cached sequence: on mini at 64
    sequences that made attention most of a prefill step.
    """
    kinds = [(n == 1, s == 0) for n, s in zip(lengths, starts)]
    runs, begin = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[begin]:
            runs.append(slice(begin, i))
            begin = i
    return runs


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
        overlap_min_tokens: int | None = None,
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
        self.overlap_min_tokens = overlap_min_tokens  # None, or steps with fewer tokens: one micro-batch

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
        lengths = [len(t) for t in tokens]
        self.cache.reserve(max(s + n for s, n in zip(starts, lengths)))
        batches = [self._micro_batch(tokens[part], slots[part], starts[part]) for part in self._split(lengths)]
        # Two micro-batches in flight (two-batch overlap): while the experts run one micro-batch's
        # layer, the coordinator runs the other's attention. One micro-batch is the plain loop.
        for mb in batches:
            mb.call = self._attention_and_dispatch(0, mb)
        for layer in range(self.args.num_hidden_layers):
            for mb in batches:
                mb.x = mb.h + finish_moe(mb.call, self.transport)
                self._record_routing(layer, mb.call.plan, time.perf_counter() - mb.call.started)
                if layer + 1 < self.args.num_hidden_layers:
                    mb.call = self._attention_and_dispatch(layer + 1, mb)
        if self.trace:
            self.trace.end_step()
        last = torch.cat([mb.x[mb.last_token] for mb in batches])  # [B, D], in request order
        return F.linear(rms_norm(last, self.final_norm, self.args.rms_norm_eps), self.lm_head).float()

    def _split(self, lengths: list[int]) -> list[slice]:
        """Two halves of about equal tokens when the step is big enough to pay for a second round of calls."""
        total = sum(lengths)
        if self.overlap_min_tokens is None or len(lengths) < 2 or total < self.overlap_min_tokens:
            return [slice(0, len(lengths))]
        cut = next(i for i, acc in enumerate(itertools.accumulate(lengths), 1) if acc >= total / 2)
        cut = min(max(cut, 1), len(lengths) - 1)
        return [slice(0, cut), slice(cut, len(lengths))]

    def _micro_batch(self, tokens: list[list[int]], slots: list[int], starts: list[int]) -> MicroBatch:
        lengths = [len(t) for t in tokens]
        offsets = [0, *itertools.accumulate(lengths)]
        groups = [
            self._group(slots[part], starts[part], lengths[part], slice(offsets[part.start], offsets[part.stop]))
            for part in attention_groups(lengths, starts)
        ]
        flat = torch.tensor([t for seq in tokens for t in seq], device=self.device)
        last_token = torch.tensor(offsets[1:], device=self.device) - 1
        return MicroBatch(groups=groups, last_token=last_token, x=self.embed[flat])  # x [T, D]

    def _group(self, slots: list[int], starts: list[int], lengths: list[int], tokens: slice) -> AttentionGroup:
        args = self.args
        layout = build_layout(
            slots=slots, starts=starts, lengths=lengths, capacity=self.cache.capacity, window=args.sliding_window,
            dtype=self.dtype,
        )
        rope = rope_cos_sin(layout.positions, head_dim=args.head_dim, theta=args.rope_theta, dtype=self.dtype)
        return AttentionGroup(tokens, layout, rope)

    def _attention_and_dispatch(self, layer: int, mb: MicroBatch) -> MoeCall:
        """h = x + attention(norm(x)); route norm2(h); send each busy expert its tokens (not waiting)."""
        args, lw = self.args, self.layers[layer]
        normed = rms_norm(mb.x, lw.input_norm, args.rms_norm_eps)
        outputs = [
            attention(
                normed[g.tokens], lw.attn, g.layout, self.cache.k[layer], self.cache.v[layer], g.rope,
                num_heads=args.num_attention_heads, num_kv_heads=args.num_key_value_heads, head_dim=args.head_dim,
            )
            for g in mb.groups
        ]
        mb.h = mb.x + (outputs[0] if len(outputs) == 1 else torch.cat(outputs))
        m = rms_norm(mb.h, lw.post_attention_norm, args.rms_norm_eps)
        plan = route(F.linear(m, lw.gate), args.num_experts_per_tok)  # gate logits [T, E]
        return start_moe(layer, m, plan, self.transport)

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
