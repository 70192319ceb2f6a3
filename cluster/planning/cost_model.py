"""Memory and step time of the expert-parallel layout, from a model's shape and the hardware.

Layout: one coordinator GPU (embeddings, attention, routers, KV cache, lm_head) and the experts
spread over expert GPUs (an expert's every layer together), some of them perhaps on one CPU
worker, and spare slots holding copies of hot experts. A dense (Mistral) model is the same
equations with one expert every token takes, its MLP, and no router: all of it on one GPU.
A decode step of batch c runs, per layer, attention on the coordinator, then dispatch, the
busiest expert worker, and combine, in sequence; then the lm_head. Each part costs the larger
of its bytes over bandwidth and its FLOPs over compute (a roofline), at the efficiencies below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.errors import UserError
from cluster.planning.hardware import CPU_NODE, Gpu, Interconnect
from mixtral.config import ModelArgs
from mixtral.kv_spec import KVSpec

DTYPE_OF_BYTES = {4: "float32", 2: "bfloat16"}  # the planner's --dtype choices, by bytes a parameter

BANDWIDTH_EFFICIENCY = 0.8  # of spec-sheet memory bandwidth reached by weight reads
COMPUTE_EFFICIENCY = 0.5  # of spec-sheet tensor FLOP/s reached by these GEMMs
RUNTIME_RESERVE_GB = 1.5  # CUDA context, allocator slack, framework buffers


@dataclass(frozen=True)
class MemorySplit:
    """GB on one GPU."""

    expert_weights: float
    attention_weights: float  # everything non-expert: attention, norms, gates, embeddings, lm_head
    kv_cache: float
    activations: float
    reserve: float
    total: float

    @property
    def headroom(self) -> float:
        return self.total - self.expert_weights - self.attention_weights - self.kv_cache - self.activations - self.reserve


@dataclass(frozen=True)
class ModelCost:
    """Parameters a decode step touches and multiplies, from the model's shape."""

    attention_params: int  # per layer: q, k, v, o
    expert_params: int  # per layer and expert: w1, w2, w3 (a dense model's MLP: gate_proj, up_proj, down_proj)
    gate_params: int  # per layer: Mixtral's router; a dense model has none
    head_params: int  # lm_head, read every step, tied to the embeddings or not (the embedding lookup reads only T rows)

    @staticmethod
    def of(args: ModelArgs) -> ModelCost:
        d, h, g, dh = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        return ModelCost(
            attention_params=d * dh * (2 * h + 2 * g),
            expert_params=3 * d * args.intermediate_size,
            gate_params=d * args.num_local_experts if args.is_moe else 0,
            head_params=args.vocab_size * d,
        )


def busy_experts(tokens: int, experts: int, top_k: int) -> float:
    """Expected experts with at least one of `tokens` tokens, under uniform routing."""
    return experts * (1 - (1 - top_k / experts) ** tokens)


def kv_spec(args: ModelArgs, bytes_per_param: int) -> KVSpec:
    """The engine's own KV accounting (blocks, window recycling) for this model at this precision:
    the KVSpec the engine builds for the dtype of that many bytes."""
    return KVSpec.of(args, DTYPE_OF_BYTES[bytes_per_param])


def non_expert_params(args: ModelArgs) -> int:
    """What the coordinator holds, as the runtime reads it (cluster.model_runner.non_expert_weights) less
    a dense model's MLP: the embeddings; per layer q, k, v, o, two norms and (Mixtral) the router; the
    final norm; and the lm_head unless it is tied to the embeddings (one matrix then serves both)."""
    cost = ModelCost.of(args)
    d = args.hidden_size
    embed = args.vocab_size * d
    head = 0 if args.tie_word_embeddings else cost.head_params
    return args.num_hidden_layers * (cost.attention_params + cost.gate_params + 2 * d) + d + embed + head


def expert_params_all_layers(args: ModelArgs) -> int:
    """One expert over every layer (a dense model's MLP over every layer)."""
    return args.num_hidden_layers * ModelCost.of(args).expert_params


def model_params(args: ModelArgs) -> int:
    """Every weight the runtime holds, each once: the non-expert ones and every expert's. For a dense
    model, what its one GPU holds (embed, attention, norms, MLP, lm_head unless tied)."""
    return non_expert_params(args) + args.num_local_experts * expert_params_all_layers(args)


@dataclass(frozen=True)
class Layout:
    experts_per_gpu: int  # expert slots of one expert GPU (>= 1)
    gpus_per_expert: int  # expert GPUs one expert is split over (>= 1; > 1 only when experts_per_gpu == 1)
    expert_gpus: int
    cpu_experts: int = 0  # experts held by one CPU worker (a CPU node's memory and cores) instead
    hot_copies: int = 0  # spare slots on the expert GPUs holding copies of hot experts

    @property
    def gpus(self) -> int:
        return 1 + self.expert_gpus

    @property
    def cpu_workers(self) -> int:
        return 1 if self.cpu_experts else 0

    def skew_after_copies(self, skew: float, experts: int) -> float:
        """The busiest GPU's load over the mean, once copies split the hot experts (rebalancing puts
        them where the measured load is): the spare copies take their share off the peak."""
        gpu_experts = experts - self.cpu_experts
        return max(1.0, skew * gpu_experts / (gpu_experts + self.hot_copies)) if gpu_experts else 1.0


def layout_for(
    args: ModelArgs,
    gpu: Gpu,
    expert_bytes_per_param: float,
    *,
    activation_gb: float,
    max_experts_per_gpu: int | None = None,
    cpu_experts: int = 0,
    hot_copies: int = 0,
) -> Layout:
    """Experts (all but `cpu_experts`) and `hot_copies` spare copies packed on as few expert GPUs as
    memory and `max_experts_per_gpu` allow; an expert larger than a GPU is split over several."""
    experts = args.num_local_experts
    if not 0 <= cpu_experts < experts:
        raise UserError(f"--cpu-experts must be from 0 to {experts - 1} (at least one expert stays on a GPU)")
    usable = gpu.memory_gb - RUNTIME_RESERVE_GB - activation_gb
    expert_gb = expert_params_all_layers(args) * expert_bytes_per_param / 1e9
    on_gpus = experts - cpu_experts
    if expert_gb <= usable:
        most = min(on_gpus, max(1, int(usable // expert_gb)), max_experts_per_gpu or experts)
        # As few GPUs as memory allows, the experts spread evenly over them: the busiest GPU sets
        # the layer's time, so 4 + 4 beats 6 + 2 on the same two GPUs.
        gpus = math.ceil((on_gpus + hot_copies) / most)
        per_gpu = math.ceil((on_gpus + hot_copies) / gpus)
        # per_gpu <= the experts on GPUs, so each expert's copies always find GPUs of their own.
        return Layout(per_gpu, 1, math.ceil((on_gpus + hot_copies) / per_gpu), cpu_experts, hot_copies)
    if hot_copies or cpu_experts:
        raise UserError(f"an expert ({expert_gb:.1f} GB) is split over GPUs here; copies and CPU experts need it whole")
    split = math.ceil(expert_gb / usable)
    return Layout(1, split, split * experts)


def memory_splits(
    args: ModelArgs,
    gpu: Gpu,
    layout: Layout,
    bytes_per_param: int,
    *,
    kv_tokens: int,
    activation_gb: float,
    expert_bytes_per_param: float | None = None,
) -> tuple[MemorySplit, MemorySplit]:
    """(coordinator GPU, one expert GPU); expert weights at `expert_bytes_per_param` (int8: 1)."""
    coordinator = MemorySplit(
        expert_weights=0.0,
        attention_weights=non_expert_params(args) * bytes_per_param / 1e9,
        kv_cache=kv_tokens * kv_spec(args, bytes_per_param).bytes_per_token / 1e9,
        activations=activation_gb,
        reserve=RUNTIME_RESERVE_GB,
        total=gpu.memory_gb,
    )
    expert_bytes = bytes_per_param if expert_bytes_per_param is None else expert_bytes_per_param
    expert_gb = expert_params_all_layers(args) * expert_bytes / 1e9 * layout.experts_per_gpu / layout.gpus_per_expert
    worker = MemorySplit(
        expert_weights=expert_gb,
        attention_weights=0.0,
        kv_cache=0.0,
        activations=activation_gb,
        reserve=RUNTIME_RESERVE_GB,
        total=gpu.memory_gb,
    )
    return coordinator, worker


def _roofline(bytes_read: float, flops: float, gpu: Gpu) -> float:
    return max(bytes_read / (gpu.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY), flops / (gpu.tflops * 1e12 * COMPUTE_EFFICIENCY))


def step_seconds(
    args: ModelArgs,
    gpu: Gpu,
    link: Interconnect | None,
    layout: Layout,
    *,
    tokens: int,
    sequences: int,
    context: int,
    bytes_per_param: int,
    skew: float,
    expert_bytes_per_param: float | None = None,
) -> float:
    """One engine step feeding `tokens` tokens of `sequences` sequences of `context` tokens (decode: tokens == sequences)."""
    cost = ModelCost.of(args)
    b, k, e, d = bytes_per_param, args.num_experts_per_tok, args.num_local_experts, args.hidden_size
    eb = b if expert_bytes_per_param is None else expert_bytes_per_param
    # Each sequence's keys and values as the engine gathers them: whole blocks, those of its window only.
    spec = kv_spec(args, b)
    kv_tokens = spec.blocks_per_sequence(context, args.sliding_window) * spec.block_size
    attention = _roofline(
        (cost.attention_params + cost.gate_params) * b + sequences * kv_tokens * spec.bytes_per_token / args.num_hidden_layers,
        2 * tokens * (cost.attention_params + cost.gate_params),
        gpu,
    )
    mean_tokens = tokens * k / e
    hot = min(tokens, layout.skew_after_copies(skew, e) * mean_tokens)  # the busiest expert's tokens this layer
    gpu_tokens = hot * layout.experts_per_gpu if layout.experts_per_gpu > 1 else hot
    busy_on_gpu = min(layout.experts_per_gpu, busy_experts(tokens, e, k) / max(1, layout.expert_gpus) * layout.gpus_per_expert)
    experts = _roofline(
        busy_on_gpu * cost.expert_params * eb / layout.gpus_per_expert,
        2 * gpu_tokens * cost.expert_params / layout.gpus_per_expert,
        gpu,
    )
    if layout.cpu_experts:  # one CPU worker, its experts one after another, beside the GPUs
        busy_on_cpu = min(layout.cpu_experts, busy_experts(tokens, e, k) * layout.cpu_experts / e)
        cpu = _roofline(
            busy_on_cpu * cost.expert_params * eb, 2 * mean_tokens * layout.cpu_experts * cost.expert_params, CPU_NODE
        )
        experts = max(experts, cpu)
    dispatch = 0.0
    if link is not None:  # send the hot GPU's tokens out and back, after one message latency each way
        dispatch = 2 * link.latency_us * 1e-6 + 2 * gpu_tokens * d * b / (link.bandwidth_gbs * 1e9)
    head = _roofline(cost.head_params * b, 2 * sequences * cost.head_params, gpu)
    return args.num_hidden_layers * (attention + dispatch + experts) + head
