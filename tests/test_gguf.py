"""The project's GGUF converter: what it writes, read back with the gguf package's own reader, holds
every tensor llama.cpp's llama architecture reads, with the right name, shape and values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.bench.gguf_export import rotary_rows_for_ggml, write_gguf
from mixtral import names
from mixtral.checkpoint import Checkpoint


def hf_tensor(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    [(_, tensor)] = checkpoint.reader().read([name], dtype=torch.float32)
    return tensor


def test_the_rotary_reorder_pairs_each_heads_halves_as_ggml_rotates_them() -> None:
    heads, head_dim = 3, 8
    w = torch.arange(heads * head_dim, dtype=torch.float32)[:, None].repeat(1, 2)  # row r holds r
    ggml = rotary_rows_for_ggml(w, heads)[:, 0].long().tolist()
    # Within each head, GGML's rows 2i and 2i + 1 are HF's rows i and i + Dh/2: the pair RoPE rotates together.
    expected = [h * head_dim + i + half * head_dim // 2 for h in range(heads) for i in range(head_dim // 2) for half in (0, 1)]
    assert ggml == expected


@pytest.mark.parametrize("preset", ["tiny", "mistral-tiny"])
def test_a_written_gguf_holds_every_tensor_with_its_name_shape_and_values(make_ckpt, tmp_path: Path, preset: str) -> None:  # type: ignore[no-untyped-def]
    import gguf

    checkpoint = Checkpoint.open(make_ckpt(preset=preset, tokenizer=True, vocab_size=32000))
    args = checkpoint.args
    reader = gguf.GGUFReader(write_gguf(checkpoint, tmp_path / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}

    def field(key: str) -> object:
        return reader.get_field(key).contents()

    assert field("general.architecture") == "llama" and field("llama.block_count") == args.num_hidden_layers
    assert field("llama.attention.head_count_kv") == args.num_key_value_heads
    assert (
        field("llama.expert_count") == args.num_local_experts if args.is_moe else reader.get_field("llama.expert_count") is None
    )
    assert len(field("tokenizer.ggml.tokens")) == args.vocab_size  # type: ignore[arg-type]

    def same(name: str, expected: torch.Tensor) -> None:
        stored = np.asarray(tensors[name].data).reshape(expected.shape)  # the reader's numpy view, row-major
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(stored, expected.numpy())  # written and read, not computed: exact

    same("token_embd.weight", hf_tensor(checkpoint, names.EMBED))
    same("output.weight", hf_tensor(checkpoint, names.LM_HEAD))
    same("output_norm.weight", hf_tensor(checkpoint, names.FINAL_NORM))
    expected_names = {"token_embd.weight", "output.weight", "output_norm.weight"}
    for layer in range(args.num_hidden_layers):

        def hf(suffix: str, layer: int = layer) -> torch.Tensor:
            return hf_tensor(checkpoint, names.layer_weight(layer, suffix))

        blk = f"blk.{layer}."
        same(blk + "attn_q.weight", rotary_rows_for_ggml(hf("self_attn.q_proj"), args.num_attention_heads))
        same(blk + "attn_k.weight", rotary_rows_for_ggml(hf("self_attn.k_proj"), args.num_key_value_heads))
        same(blk + "attn_v.weight", hf("self_attn.v_proj"))
        same(blk + "attn_output.weight", hf("self_attn.o_proj"))
        same(blk + "attn_norm.weight", hf("input_layernorm"))
        same(blk + "ffn_norm.weight", hf("post_attention_layernorm"))
        ffn = ["attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_norm"]
        if args.is_moe:
            same(blk + "ffn_gate_inp.weight", hf(names.GATE))
            for w, stack in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                experts = [hf_tensor(checkpoint, names.expert_weight(layer, e, w)) for e in range(args.num_local_experts)]
                same(f"{blk}{stack}.weight", torch.stack(experts))
            ffn += ["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
        else:
            same(blk + "ffn_gate.weight", hf("mlp.gate_proj"))
            same(blk + "ffn_up.weight", hf("mlp.up_proj"))
            same(blk + "ffn_down.weight", hf("mlp.down_proj"))
            ffn += ["ffn_gate", "ffn_up", "ffn_down"]
        expected_names |= {f"{blk}{part}.weight" for part in ffn}
    assert set(tensors) == expected_names  # nothing missing, nothing extra


def test_a_tied_lm_head_is_left_to_token_embd_and_half_precision_is_written_as_asked(make_ckpt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import gguf

    checkpoint = Checkpoint.open(make_ckpt(preset="mistral-tiny", tokenizer=True, vocab_size=32000, tie_word_embeddings=True))
    reader = gguf.GGUFReader(write_gguf(checkpoint, tmp_path / "model.gguf", dtype="float16"))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors
    embed = tensors["token_embd.weight"]
    assert embed.tensor_type == gguf.GGMLQuantizationType.F16
    stored = np.asarray(embed.data).reshape(checkpoint.args.vocab_size, checkpoint.args.hidden_size)
    np.testing.assert_array_equal(stored, hf_tensor(checkpoint, names.EMBED).numpy().astype(np.float16))
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay float32
