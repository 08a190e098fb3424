"""A tiny Llama written as an F32 GGUF file, as llama.cpp's converter lays one out, so the GGUF path is
tested without downloading a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

HEADS = 2
CHARACTERS = ["Ġ" if c == " " else chr(c) for c in range(32, 127)]  # byte-level BPE writes a space as Ġ
TOKENS = ["<unk>", "<s>", "</s>", *CHARACTERS]
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def tiny_llama_for_gguf(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _rotary_layout(weight: np.ndarray) -> np.ndarray:
    """q/k rows reordered from the HF rotary layout to GGUF's (transformers reverses this on load)."""
    return weight.reshape(HEADS, 2, weight.shape[0] // HEADS // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    """`model` and a character-level BPE tokenizer as a GGUF file at `path`."""
    import gguf

    config, state = model.config, model.state_dict()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // HEADS)
    writer.add_vocab_size(len(TOKENS))
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * len(CHARACTERS))  # control tokens, then normal ones
    writer.add_token_scores([0.0] * len(TOKENS))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for layer in range(config.num_hidden_layers):
        names |= {f"model.layers.{layer}.{hf}.weight": f"blk.{layer}.{name}.weight" for hf, name in LAYER_NAMES.items()}
    for hf, name in names.items():
        tensor = state[hf].numpy().astype(np.float32)
        writer.add_tensor(name, _rotary_layout(tensor) if name.endswith(("attn_q.weight", "attn_k.weight")) else tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
