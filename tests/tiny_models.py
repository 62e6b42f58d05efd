"""Tiny random models of every supported family, built from transformers configs."""

import torch

FAMILIES = {
    # name: (config class path, extra config) — GQA, one kv head, odd layer counts, biases, q/k norms
    "llama-gqa": ("LlamaConfig", dict(num_hidden_layers=5, num_attention_heads=4,
                                      num_key_value_heads=2)),
    "mistral-one-kv": ("MistralConfig", dict(num_hidden_layers=3, num_attention_heads=4,
                                             num_key_value_heads=1, sliding_window=None)),
    "qwen2-bias": ("Qwen2Config", dict(num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=2)),
    "qwen3-qknorm": ("Qwen3Config", dict(num_hidden_layers=7, num_attention_heads=4,
                                         num_key_value_heads=4, head_dim=8)),
}


def tiny_config(family: str, vocab_size: int = 49152):
    import transformers

    class_name, extra = FAMILIES[family]
    config = getattr(transformers, class_name)(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, max_position_embeddings=256,
        tie_word_embeddings=True, **extra)
    return config


def tiny_model(family: str, seed: int = 0, vocab_size: int = 49152):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size), dtype=torch.float32)
    # Random init is too uniform to tell layers apart: scale up some weights for contrast.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def padded_batch(vocab_size: int, lengths=(12, 9, 5), seed: int = 0):
    """Left-padded random ids [B, T] and their mask (1 = token, 0 = padding)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab_size, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask
