"""A checkpoint as GGUF, for llama.cpp: the peer a CPU user of Mixtral picks, benchmarked on the same weights.

llama.cpp runs Mixtral and Mistral as its "llama" architecture: the same hyperparameters under
`llama.*` keys (with `expert_count` and `expert_used_count` for Mixtral), the SentencePiece vocabulary
under `tokenizer.ggml.*`, and tensors under its own names (the `gguf` package's TensorNameMap gives
them). Three things differ from the Hugging Face layout:

- q_proj and k_proj rows are reordered: HF rotates each head's two halves (rotate-half RoPE), GGML
  rotates adjacent pairs; within each head, row 2i + j of GGML's is row j * Dh/2 + i of HF's.
- a layer's experts are stacked into one tensor each: ffn_gate_exps [E, I, D] (w1), ffn_up_exps
  [E, I, D] (w3), ffn_down_exps [E, D, I] (w2).
- a tied lm_head is left out (llama.cpp reads token_embd for it).

The weights are written in the precision asked for (float32, float16 or bfloat16), read from the
checkpoint as the engine reads them (mixtral.checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster.errors import UserError
from mixtral import names
from mixtral.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

EXPERT_STACKS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def rotary_rows_for_ggml(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q_proj or k_proj [heads * Dh, D] with each head's rows from rotate-half order (HF: the first
    Dh/2 rows pair with the last Dh/2) to adjacent pairs (GGML: rows 2i and 2i + 1 pair)."""
    rows, cols = w.shape
    head_dim = rows // heads
    return w.reshape(heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensors(checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in GGUF's layout), every tensor llama.cpp reads, layer by layer."""
    import gguf
    import torch

    args = checkpoint.args
    reader = checkpoint.reader()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, args.num_hidden_layers)

    def gguf_name(hf: str) -> str:
        mapped = name_map.get_name(hf, try_suffixes=(".weight",))
        if mapped is None:
            raise UserError(f"{hf} has no GGUF name for llama.cpp's llama architecture")
        return mapped

    def read(hf_names: list[str]) -> dict[str, torch.Tensor]:
        return dict(reader.read(hf_names, dtype=torch.float32))

    top = [names.EMBED, names.FINAL_NORM] + ([] if args.tie_word_embeddings else [names.LM_HEAD])
    yield from ((gguf_name(n), t) for n, t in read(top).items())
    for layer in range(args.num_hidden_layers):
        own = [names.layer_weight(layer, s) for s in (*names.ATTENTION, *names.NORMS)]
        own += names.feed_forward_weights(layer, moe=args.is_moe)
        for name, tensor in read(own).items():
            if name.endswith("q_proj.weight"):
                tensor = rotary_rows_for_ggml(tensor, args.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                tensor = rotary_rows_for_ggml(tensor, args.num_key_value_heads)
            yield gguf_name(name), tensor
        if args.is_moe:
            for w, stack in EXPERT_STACKS.items():
                experts = read([names.expert_weight(layer, e, w) for e in range(args.num_local_experts)])
                yield f"blk.{layer}.{stack}.weight", torch.stack(list(experts.values()))


def write_gguf(checkpoint: Checkpoint, out: str | Path, *, dtype: str = "float32") -> Path:
    """Write `checkpoint` as a GGUF file llama.cpp loads, its weights in `dtype` (norms stay float32, as
    llama.cpp's converter keeps them); UserError for what llama.cpp's llama architecture cannot run."""
    import gguf

    args = checkpoint.args
    kinds = {
        "float32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
        "float16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
        "bfloat16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    }
    if dtype not in kinds:
        raise UserError(f"GGUF weights can be written as {', '.join(kinds)}, not {dtype}")
    tokenizer_dir = checkpoint.local_path()
    if not (tokenizer_dir / "tokenizer.model").is_file():
        raise UserError(f"{tokenizer_dir} has no tokenizer.model; llama.cpp needs the SentencePiece vocabulary")
    file_type, weight_type = kinds[dtype]
    out = Path(out)
    # Tensors go to a temporary file as they are added: the whole model is never held in memory at once.
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA], use_temp_file=True)
    writer.add_name(checkpoint.name)
    writer.add_file_type(file_type)
    _hyperparameters(writer, checkpoint)
    _vocabulary(writer, tokenizer_dir, args.bos_token_id, args.eos_token_ids)
    for name, tensor in gguf_tensors(checkpoint):
        data: Any = tensor.numpy()
        if data.ndim == 1 or weight_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data.astype(np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, weight_type), raw_dtype=weight_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _hyperparameters(writer: Any, checkpoint: Checkpoint) -> None:
    args = checkpoint.args
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_vocab_size(args.vocab_size)
    if args.is_moe:
        writer.add_expert_count(args.num_local_experts)
        writer.add_expert_used_count(args.num_experts_per_tok)


def _vocabulary(writer: Any, tokenizer_dir: Path, bos: int | None, eos: tuple[int, ...]) -> None:
    from gguf.vocab import SentencePieceVocab

    vocab = SentencePieceVocab(tokenizer_dir)
    pieces, scores, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(pieces))
    writer.add_token_scores(list(scores))
    writer.add_token_types([int(t) for t in types])
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos:
        writer.add_eos_token_id(eos[0])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
