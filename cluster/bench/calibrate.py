"""Measures a calibration profile's parts with the engine's own functions, at the model's shapes."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

from cluster.bench.machine import median_seconds
from cluster.planning.profile import TOKEN_COUNTS
from mixtral.config import ModelArgs
from mixtral.layers import HeldExpert, held_expert_ffn, linear, linear_weight
from workers.device import cores, matmul_dtype, onednn_packs, set_coordinator_threads

EXPERT_LAYERS_CYCLED = 4


def _ms(fn: Any, repeats: int = 5) -> float:
    return 1e3 * median_seconds(fn, repeats)


def measure_parts(args: ModelArgs, dtype: str, *, context: int) -> dict[str, Any]:
    """Times of the model's parts, with random weights of the model's shapes and the engine's own
    functions: attention over a KV cache of `context` tokens per sequence, routing, the expert FFN
    (on one thread, as a worker runs it), the lm_head and sampling (on every core, as the
    coordinator runs them: workers.device.set_coordinator_threads)."""
    from cluster.engine.sampling import SamplingParams, sample_batch
    from mixtral.attention import AttentionWeights

    threads = torch.get_num_threads()
    dt = getattr(torch, dtype)
    d, i = args.hidden_size, args.intermediate_size
    q_out, kv_out = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    # A worker runs a different layer's weights on every call, so they come from memory, not
    # cache: cycle through a few layers' worth (one set, warm in cache, ran 40% faster at T=1).
    torch.set_num_threads(1)
    expert_dt = matmul_dtype(dt, "cpu")  # what a worker's GEMMs run in here, on its one thread
    layers = [
        HeldExpert.of(torch.randn(i, d), torch.randn(d, i), torch.randn(i, d), expert_dt) for _ in range(EXPERT_LAYERS_CYCLED)
    ]
    next_layer = itertools.cycle(layers)
    packed = onednn_packs(dt, "cpu", cores())  # as the coordinator holds them, on every core
    attn = AttentionWeights.of(
        torch.randn(q_out, d, dtype=dt) / d**0.5,
        torch.randn(kv_out, d, dtype=dt) / d**0.5,
        torch.randn(kv_out, d, dtype=dt) / d**0.5,
        torch.randn(d, q_out, dtype=dt) / q_out**0.5,
        packed=packed,
    )
    gate = torch.randn(args.num_local_experts, d, dtype=dt)
    head = linear_weight(torch.randn(args.vocab_size, d, dtype=dt), packed=packed)
    greedy = SamplingParams(temperature=0)
    parts: dict[str, Any] = {"expert_ms": [], "coordinator_layer_ms": [], "head_ms": [], "context": context}
    try:
        for t in TOKEN_COUNTS:
            x = torch.randn(t, d, dtype=dt)
            repeats = 5 if t <= 256 else 2
            torch.set_num_threads(1)
            parts["expert_ms"].append(_ms(lambda x=x: held_expert_ffn(x, next(next_layer)), repeats))
            set_coordinator_threads(None)
            parts["coordinator_layer_ms"].append(_ms(_attention_step(args, attn, gate, x, context, dt), repeats))
            if t <= 256:

                def tail(x: torch.Tensor = x) -> None:
                    logits = linear(x, head).float()
                    tokens = sample_batch(logits, [greedy] * len(logits), [None] * len(logits))
                    torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])

                parts["head_ms"].append(_ms(tail, repeats))
            else:
                parts["head_ms"].append(float("nan"))
    finally:
        torch.set_num_threads(threads)
    return parts


def _attention_step(args: ModelArgs, attn: Any, gate: torch.Tensor, x: torch.Tensor, context: int, dt: torch.dtype) -> Any:
    """One layer of the coordinator for T tokens: decode of T sequences at `context`, or (T > 256)
    prefill chunks of `context` tokens from position 0."""
    from mixtral.attention import attention
    from mixtral.kv_cache import PagedKVCache
    from mixtral.kv_spec import KVSpec
    from mixtral.layers import rope_cos_sin
    from mixtral.layout import build_layout

    t = x.shape[0]
    if t <= 256:
        sequences, starts, lengths = t, [context] * t, [1] * t
    else:
        sequences = max(1, t // context)
        starts, lengths = [0] * sequences, [t // sequences] * sequences
        lengths[-1] += t - sum(lengths)
    spec = KVSpec(1, args.num_key_value_heads, args.head_dim, x.element_size())
    per_sequence = spec.blocks_per_sequence(context + max(lengths), None)
    cache = PagedKVCache(spec, sequences * per_sequence, dtype=dt)
    blocks = [list(range(b * per_sequence, (b + 1) * per_sequence)) for b in range(sequences)]
    layout = build_layout(
        blocks=blocks,
        first_block=[0] * sequences,
        starts=starts,
        lengths=lengths,
        block_size=spec.block_size,
        window=None,
        dtype=dt,
    )
    rope = rope_cos_sin(layout.positions, head_dim=args.head_dim, theta=args.rope_theta, dtype=dt)

    def step() -> None:
        h = x + attention(
            x,
            attn,
            layout,
            cache.k[0],
            cache.v[0],
            rope,
            num_heads=args.num_attention_heads,
            num_kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
        )
        F.linear(h, gate)

    return step


def measure_dispatch(workers: list[Any], secret: bytes, hidden: int, dtype: str) -> dict[str, float]:
    """Median round trip of one MoE layer's calls to `busy` workers, through the engine's own
    transport, with no tokens: the channel and the workers' wake-ups, not their compute, which
    `expert_ms` already counts."""
    from cluster.supervisor import WorkerSupervisor
    from router.channel_transport import ChannelTransport
    from router.transport import WorkerBatch

    transport = ChannelTransport(WorkerSupervisor.here(workers, secret=secret))
    x = torch.zeros(0, hidden, dtype=getattr(torch, dtype))
    out = {}
    try:
        for busy in sorted({1, min(2, len(workers)), len(workers)}):
            out[str(busy)] = _ms(
                lambda busy=busy: transport.gather(transport.submit(0, {w: WorkerBatch(x, ()) for w in range(busy)})), 15
            )
    finally:
        transport.close()
    return out
