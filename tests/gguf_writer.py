"""Tiny random models written to GGUF files offline, the way llama.cpp's convert_hf_to_gguf.py
writes them, for tests/test_gguf.py.

`write_gguf(model, path)` writes a transformers Llama, Gemma 2, Gemma 3 (text) or Phi-3 causal
LM and the offline byte tokenizer (tests/tiny_models.py) to one GGUF file with the `gguf`
package: every tensor F32, named by gguf's own HF -> GGUF tensor map (the map transformers
inverts when it reads the file), with the changes llama.cpp makes to the values and that
transformers undoes on reading (transformers/modeling_gguf_pytorch_utils.py):
  llama      q_proj / k_proj rows permuted per head from transformers' rotate-half RoPE layout
             to GGML's interleaved pairs (LlamaTensorProcessor reverses it);
  gemma2/3   every RMSNorm weight stored as 1 + w (Gemma computes x · (1 + w); GGML x · w;
             Gemma2TensorProcessor subtracts 1);
  phi3       nothing: the fused qkv_proj and gate_up_proj are stored as they are (attn_qkv,
             ffn_up).
The metadata are the keys llama.cpp writes for each architecture (general.*, {arch}.*), and the
tokenizer is a byte-level BPE vocabulary (tokenizer.ggml.model "gpt2", no merges: one id per
byte, the same ids as tiny_models.offline_tokenizer), which transformers' GGUF tokenizer
converter builds for every architecture.

What llama.cpp's GGUF cannot hold, and so a model written here must not use (write_gguf refuses
it): a Gemma query_pre_attn_scalar other than head_dim (llama.cpp derives the scale from the
model size), a Gemma 3 sliding-layer pattern other than llama.cpp's fixed 5 local : 1 global or a
local RoPE base other than 10000, a Llama with biases or an untied head of another shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ARCHITECTURES = {"llama": "llama", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL = 1, 3  # llama.cpp's token types


def gguf_architecture(model_type: str) -> str:
    if model_type not in ARCHITECTURES:
        raise ValueError(f"gguf_writer writes {sorted(ARCHITECTURES)}, not {model_type!r}")
    return ARCHITECTURES[model_type]


def llama_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permute of q/k rows [n_head · head_dim, in]: per head, the halves of
    transformers' rotate-half layout become interleaved pairs (convert_hf_to_gguf.py)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _check_representable(config) -> None:
    """A ValueError for a setting the GGUF of its architecture cannot carry (module docstring)."""
    model_type = config.model_type
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if model_type in ("gemma2", "gemma3_text") and config.query_pre_attn_scalar != head_dim:
        raise ValueError("llama.cpp scales Gemma queries by head_dim: set query_pre_attn_scalar "
                         f"= {head_dim}")
    if model_type == "gemma3_text":
        pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                   for i in range(config.num_hidden_layers)]
        if list(config.layer_types) != pattern:
            raise ValueError("llama.cpp's Gemma 3 has every 6th layer global: leave layer_types "
                             "at its default")
        if config.rope_parameters["sliding_attention"].get("rope_theta") != 10000.0:
            raise ValueError("llama.cpp's Gemma 3 local RoPE base is 10000")
    if model_type == "llama" and (config.attention_bias or config.mlp_bias):
        raise ValueError("llama.cpp's Llama GGUF here carries no biases")


def _metadata(writer, config, arch: str, name: str) -> None:
    """The {arch}.* keys llama.cpp's convert_hf_to_gguf.py writes for this architecture."""
    model_type = config.model_type
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_file_type(0)  # ALL_F32
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = config.rope_parameters
    if model_type == "gemma3_text":
        full = rope["full_attention"]
        writer.add_rope_freq_base(full["rope_theta"])  # the global layers' base
        if full.get("rope_type", "default") == "linear":
            import gguf

            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
    else:
        writer.add_rope_freq_base(rope["rope_theta"])
    if model_type == "llama":
        writer.add_rope_dimension_count(head_dim)
    if model_type in ("gemma2", "gemma3_text"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
    if model_type == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if model_type == "gemma3_text" and config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if model_type == "phi3":
        # llama.cpp: int(partial_rotary_factor · hidden_size) // heads
        factor = rope.get("partial_rotary_factor", 1.0)
        writer.add_rope_dimension_count(int(factor * config.hidden_size)
                                        // config.num_attention_heads)
        if config.sliding_window is not None:
            writer.add_sliding_window(config.sliding_window)


def _tokenizer_metadata(writer, tokenizer) -> None:
    """A byte-level BPE vocabulary without merges: ids as in `tokenizer`, specials as control."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    # With no merges in the file transformers derives them from the scores: none here, since no
    # token is two others joined.
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([TOKEN_TYPE_CONTROL if t in special else TOKEN_TYPE_NORMAL
                            for t in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _tensors(model, arch: str):
    """(GGUF name, F32 array) for every weight of `model`, changed as llama.cpp changes it."""
    import gguf

    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = bool(config.tie_word_embeddings)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp writes no output.weight when the head is the embedding
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(base)
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {hf_name} in architecture {arch}")
        data = tensor.detach().to(torch.float32).numpy().copy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = (config.num_attention_heads if "q_proj" in hf_name
                     else config.num_key_value_heads)
            data = llama_permute(data, heads)
        if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            data = data + 1.0
        yield f"{gguf_name}.{suffix}", data


def write_gguf(model, path: Path, tokenizer=None, name: str | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Write `model` (Llama, Gemma 2, Gemma 3 text or Phi-3) and `tokenizer` (default: the
    offline byte tokenizer) to the GGUF file `path`, F32 (module docstring); extra_tensors
    (GGUF name -> array) are written after the model's, as they are."""
    import gguf

    if tokenizer is None:
        from tiny_models import offline_tokenizer

        tokenizer = offline_tokenizer()
    config = model.config
    arch = gguf_architecture(config.model_type)
    _check_representable(config)
    path = Path(path)
    # general.name: llama.cpp writes the model's name; transformers reads a "mistral" in it as
    # the Mistral architecture, so a neutral one here.
    writer = gguf.GGUFWriter(path, arch)
    _metadata(writer, config, arch, name or f"tiny-{arch}")
    _tokenizer_metadata(writer, tokenizer)
    for gguf_name, data in _tensors(model, arch):
        writer.add_tensor(gguf_name, data)
    for gguf_name, data in (extra_tensors or {}).items():
        writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
