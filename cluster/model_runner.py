"""The model runner: everything of the model but its feed-forward, plus the KV cache.

Per step, for the whole running batch (T new tokens over B sequences):

    x = embed(tokens)                                     # [T, D]
    for each layer l:
        h = x + attention_l(rms_norm(x), kv_cache)        # GQA, RoPE, sliding window
        x = h + feed_forward_l(rms_norm2(h))              # the model's part (mixtral.feed_forward):
                                                          #   Mixtral: router + MoE layer over the workers
                                                          #   Mistral: one dense SwiGLU MLP, here
    logits = lm_head(rms_norm(x[last token of each sequence]))   # [B, V]

Where the feed-forward runs elsewhere (Mixtral's experts), large steps run as two micro-batches
in flight: while the experts work on one micro-batch's layer, the runner runs the other's
attention (two-batch overlap).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cluster.errors import UserError
from mixtral import names
from mixtral.attention import AttentionWeights, attention
from mixtral.checkpoint import Checkpoint, ReadLog
from mixtral.config import ModelArgs
from mixtral.feed_forward import FeedForwardFactory
from mixtral.kv_cache import PagedKVCache
from mixtral.kv_spec import GiB, KVSpec
from mixtral.layers import linear, linear_weight, rms_norm, rope_cos_sin
from mixtral.layout import StepLayout, build_layout
from mixtral.step_clock import StepClock, synchronizer
from workers.device import cores, matmul_dtype, onednn_packs

DEFAULT_CPU_KV_BYTES = 4 * GiB
DEFAULT_GPU_FREE_SHARE = 0.9  # of a GPU's free memory, for the KV cache, unless --gpu-memory-utilization says


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


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # [D]
    attn: AttentionWeights
    post_attention_norm: torch.Tensor  # [D]


def non_expert_weights(args: ModelArgs) -> list[str]:
    """What the coordinator reads: all but Mixtral's experts (a dense model's MLP included)."""
    per_layer = [*names.ATTENTION, *names.NORMS]
    tensors = [names.EMBED, names.FINAL_NORM] + [
        name
        for layer in range(args.num_hidden_layers)
        for name in [names.layer_weight(layer, s) for s in per_layer] + names.feed_forward_weights(layer, moe=args.is_moe)
    ]
    return tensors if args.tie_word_embeddings else tensors + [names.LM_HEAD]


def attention_groups(lengths: list[int], starts: list[int]) -> list[slice]:
    """Runs of consecutive sequences of one kind: decoding (one new token), starting a prompt
    (nothing cached), or continuing one.

    One padded grid for a whole mixed step would pad every decode to the longest prompt chunk
    and give every fresh prompt the cache columns of the longest cached sequence, so that padding,
    not tokens, would set the cost of attention in a mixed prefill step.
    """
    kinds = [(n == 1, s == 0) for n, s in zip(lengths, starts)]
    runs, begin = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[begin]:
            runs.append(slice(begin, i))
            begin = i
    return runs


def split_for_overlap(lengths: list[int], overlap_min_tokens: int | None) -> list[slice]:
    """Two halves of about equal tokens when the step is big enough to pay for a second round of calls."""
    total = sum(lengths)
    if overlap_min_tokens is None or len(lengths) < 2 or total < overlap_min_tokens:
        return [slice(0, len(lengths))]
    cut = next(i for i, acc in enumerate(itertools.accumulate(lengths), 1) if acc >= total / 2)
    cut = min(max(cut, 1), len(lengths) - 1)
    return [slice(0, cut), slice(cut, len(lengths))]


class ModelRunner:
    def __init__(
        self,
        checkpoint: Checkpoint,
        feed_forward: FeedForwardFactory,
        *,
        dtype: torch.dtype,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        gpu_memory_utilization: float | None = None,
        block_size: int = 16,
        device: str = "cpu",
        overlap_min_tokens: int | None = None,
        threads: int | None = None,
        synchronized_timing: bool = False,
    ) -> None:
        """`feed_forward` builds the model's feed-forward from the weights read here (mixtral.feed_forward)."""
        self.args = args = checkpoint.args
        self.dtype = dtype
        self.device = device
        self.vocab_size = args.vocab_size
        self.max_model_len = args.context_length(max_model_len)
        self.reader = checkpoint.reader()
        w = dict(self.reader.read(non_expert_weights(args), dtype=dtype, device=device))
        # The attention's GEMMs over the cache run in float32 where this CPU's half-precision GEMM is
        # slow (as the experts' do); its projections are GEMVs in decode, fast in bf16 (mixtral.attention).
        self.score_dtype = matmul_dtype(dtype, device)
        # The projections and the lm_head packed for oneDNN's GEMM where a worker's would be, on the
        # threads its GEMMs run on (`threads`, None: every core, as set_coordinator_threads gives them).
        # Each dense matrix is dropped as it is packed (a tied lm_head is a second copy of the embeddings).
        self.packed = onednn_packs(dtype, device, threads or cores())
        self.embed = w[names.EMBED]  # [V, D]
        self.final_norm = w[names.FINAL_NORM]
        self.lm_head = linear_weight(w[names.EMBED] if args.tie_word_embeddings else w.pop(names.LM_HEAD), packed=self.packed)
        self.layers = [_layer_weights(w, layer, packed=self.packed) for layer in range(args.num_hidden_layers)]
        # Where a step's time goes (mixtral.step_clock), shared with the feed-forward; on a GPU synchronised
        # when asked for (EngineOptions.synchronized_timing).
        self.clock = StepClock(synchronizer(torch.device(self.device)) if synchronized_timing else None)
        self.feed_forward = feed_forward(w, self.packed, self.clock)
        spec = KVSpec.of(args, str(dtype).removeprefix("torch."), block_size)
        room = float(DEFAULT_CPU_KV_BYTES)
        if device.startswith("cuda"):  # measured after the weights are in: what they left of the share
            free, total = torch.cuda.mem_get_info(device)
            room = gpu_kv_budget(free, total, gpu_memory_utilization)
        num_blocks = kv_cache_blocks(spec, kv_cache_bytes, max_num_seqs, self.max_model_len, args.sliding_window, room=room)
        self.cache = PagedKVCache(spec, num_blocks, dtype=dtype, device=device)
        # None, or steps with fewer tokens: one micro-batch. A feed-forward computed here gains nothing from two.
        self.overlap_min_tokens = overlap_min_tokens if self.feed_forward.overlaps else None

    @torch.inference_mode()
    def forward(
        self, tokens: list[list[int]], *, starts: list[int], blocks: list[list[int]], first_block: list[int]
    ) -> torch.Tensor:
        """Run one step: sequence b feeds tokens[b] at positions starts[b].. into its blocks
        (blocks[b] holding its logical blocks first_block[b], first_block[b] + 1, ...).

        Returns float32 logits [B, V] of each sequence's last new token.
        """
        with self.clock.timing("prepare"):
            lengths = [len(t) for t in tokens]
            parts = split_for_overlap(lengths, self.overlap_min_tokens)
            batches = [self._micro_batch(tokens[part], starts[part], blocks[part], first_block[part]) for part in parts]
        # Each micro-batch's pass yields while its experts work, and the other's takes its turn.
        with self.feed_forward.step():
            for _ in itertools.zip_longest(*(self._layers(mb) for mb in batches)):
                pass
        with self.clock.timing("head"):
            last = torch.cat([mb.x[mb.last_token] for mb in batches])  # [B, D], in request order
            return linear(rms_norm(last, self.final_norm, self.args.rms_norm_eps), self.lm_head).float()

    def _layers(self, mb: MicroBatch) -> Iterator[None]:
        """The residual stream of one micro-batch through every layer; yields while its feed-forward runs elsewhere."""
        eps, x, feed_forward, clock = self.args.rms_norm_eps, mb.x, self.feed_forward, self.clock
        for layer, lw in enumerate(self.layers):
            with clock.timing("attention"):
                h = x + self._attention(layer, rms_norm(x, lw.input_norm, eps), mb.groups)
                m = rms_norm(h, lw.post_attention_norm, eps)
            pending = feed_forward.start(layer, m)
            if feed_forward.overlaps:
                yield
            x = h + feed_forward.finish(pending)
        mb.x = x

    def _attention(self, layer: int, x: torch.Tensor, groups: list[AttentionGroup]) -> torch.Tensor:
        """Attention of every group's tokens over this layer's cache.  x [T, D] -> [T, D]"""
        args, cache = self.args, self.cache
        outputs = [
            attention(
                x[g.tokens],
                self.layers[layer].attn,
                g.layout,
                cache.k[layer],
                cache.v[layer],
                g.rope,
                num_heads=args.num_attention_heads,
                num_kv_heads=args.num_key_value_heads,
                head_dim=args.head_dim,
                score_dtype=self.score_dtype,
            )
            for g in groups
        ]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _micro_batch(
        self, tokens: list[list[int]], starts: list[int], blocks: list[list[int]], first_block: list[int]
    ) -> MicroBatch:
        lengths = [len(t) for t in tokens]
        offsets = [0, *itertools.accumulate(lengths)]
        groups = [
            self._group(
                starts[part], lengths[part], blocks[part], first_block[part], slice(offsets[part.start], offsets[part.stop])
            )
            for part in attention_groups(lengths, starts)
        ]
        flat = torch.tensor([t for seq in tokens for t in seq], device=self.device)
        last_token = torch.tensor(offsets[1:], device=self.device) - 1
        return MicroBatch(groups=groups, last_token=last_token, x=self.embed[flat])  # x [T, D]

    def _group(
        self, starts: list[int], lengths: list[int], blocks: list[list[int]], first_block: list[int], tokens: slice
    ) -> AttentionGroup:
        args = self.args
        layout = build_layout(
            blocks=blocks,
            first_block=first_block,
            starts=starts,
            lengths=lengths,
            block_size=self.cache.block_size,
            window=args.sliding_window,
            dtype=self.dtype,
        ).to(self.device)
        rope = rope_cos_sin(layout.positions, head_dim=args.head_dim, theta=args.rope_theta, dtype=self.dtype)
        return AttentionGroup(tokens, layout, rope)

    def read_log(self) -> ReadLog:
        return self.reader.log


def gpu_kv_budget(free: int, total: int, utilization: float | None) -> float:
    """The KV cache's room on a GPU, measured after the weights are in. With --gpu-memory-utilization
    (vLLM's meaning): of `utilization` x the device's memory, what is not in use already; without it,
    90% of what is free."""
    if utilization is None:
        return DEFAULT_GPU_FREE_SHARE * free
    return max(0.0, free - (1 - utilization) * total)


def kv_cache_blocks(
    spec: KVSpec, budget_bytes: int | None, max_num_seqs: int, max_model_len: int, window: int | None, *, room: float
) -> int:
    """Blocks of the KV pool: the budget's worth, or by default what max_num_seqs sequences of
    max_model_len can hold at once, at most `room` bytes (a GPU's share, or 4 GiB on a CPU as vLLM's CPU default).

    Raises UserError, with the numbers and the fix, when the pool cannot hold one sequence of max_model_len.
    """
    if budget_bytes is None:
        wanted = spec.pool_bytes(max_num_seqs * spec.blocks_per_sequence(max_model_len, window))
        budget = min(room, wanted)
    else:
        budget = budget_bytes
    if problem := spec.budget_problem(budget, max_model_len, window):
        raise UserError(problem)
    return spec.blocks_in(budget)


def _layer_weights(w: dict[str, torch.Tensor], layer: int, *, packed: bool) -> LayerWeights:
    def get(suffix: str) -> torch.Tensor:
        return w[names.layer_weight(layer, suffix)]

    q, k, v, o = (w.pop(names.layer_weight(layer, s)) for s in names.ATTENTION)
    return LayerWeights(
        input_norm=get("input_layernorm"),
        attn=AttentionWeights.of(q, k, v, o, packed=packed),
        post_attention_norm=get("post_attention_layernorm"),
    )
