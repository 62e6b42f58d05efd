"""fastgen: static-cache generation gives generate()'s greedy tokens, with timings."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from cqil_cli.runtime.checkpoint import build_cqil_model
from cqil_cli.runtime.fastgen import FastGenerator, fast_generate

V = 128


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, max_position_embeddings=256,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=True, **common))
    elif kind == "mistral":  # one kv head, sliding window shorter than prompt + generation
        model = MistralForCausalLM(MistralConfig(num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1,
                                                 sliding_window=6, **common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=32, **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def padded_batch():
    return tiny_models.padded_batch(V, lengths=(11, 7, 4))


def greedy_generate(model, ids, mask, n):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("kind,groups,distance", [
    ("llama", "none", 0),
    ("llama", "1-2,3-4", 1),
    ("mistral", "0-1,2-4,5-6", 2),
    ("qwen3", "0-3", 3),
])
def test_fastgen_greedy_equals_generate(kind, groups, distance):
    model = build_cqil_model(tiny(kind), groups, distance)
    with torch.no_grad():
        for layer in model.model.layers:  # non-trivial bypass weights
            for p in (layer.cqil_gamma, layer.cqil_beta):
                if p is not None:
                    p.uniform_(0.6, 1.2)
    ids, mask = padded_batch()
    want = greedy_generate(model, ids, mask, 12)
    result = FastGenerator(model).generate(ids, mask, max_new_tokens=12)
    assert torch.equal(result.tokens, want)
    assert torch.equal(result.sequences[:, : ids.shape[1]], ids)
    assert result.prefill_s > 0 and len(result.decode_s) == 11 and all(t > 0 for t in result.decode_s)
    assert result.decode_ms_per_token > 0


def test_fastgen_plain_model_is_converted_and_matches_transformers():
    hf = tiny("llama")
    ids, mask = padded_batch()
    want = greedy_generate(hf, ids, mask, 10)
    gen = FastGenerator(hf)  # converted with every layer a single step
    assert type(gen.model).__name__ == "CqilForCausalLM" and gen.model.config.num_steps == 5
    assert torch.equal(gen.generate(ids, mask, max_new_tokens=10).tokens, want)


def test_fastgen_reuses_its_cache_and_handles_batch_one():
    model = build_cqil_model(tiny("qwen3"), "1-2", 1)
    gen = FastGenerator(model)
    ids = torch.randint(1, V, (1, 9))
    first = gen.generate(ids, max_new_tokens=8).tokens
    cache = gen._cache
    second = gen.generate(ids, max_new_tokens=8).tokens
    assert gen._cache is cache and torch.equal(first, second)
    assert torch.equal(first, greedy_generate(model, ids, torch.ones_like(ids), 8))


def test_fastgen_stops_at_eos_like_generate():
    model = build_cqil_model(tiny("llama"), "0-1", 1)
    ids, mask = padded_batch()
    free = FastGenerator(model).generate(ids, mask, max_new_tokens=10).tokens
    eos = int(free[1, 3])  # a token sequence 1 emits: it must stop there
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    got = FastGenerator(model).generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0).tokens
    assert torch.equal(got, want)


def test_fastgen_sampling_is_seeded():
    model = build_cqil_model(tiny("mistral"), "1-2", 1)
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=10, seed=123)
    a = fast_generate(model, ids, mask, **kw).tokens
    b = fast_generate(model, ids, mask, **kw).tokens
    assert torch.equal(a, b) and a.shape == (3, 8) and int(a.max()) < V


def test_fastgen_rejects_zero_tokens():
    with pytest.raises(ValueError, match="max_new_tokens"):
        FastGenerator(build_cqil_model(tiny("llama"), "none", 0)).generate(torch.ones(1, 3, dtype=torch.long), None, 0)


def test_fastgen_layer_skipping_equals_generate():
    model = build_cqil_model(tiny("mistral"), "1-2", 1, skip_layers=[3, 5])
    ids, mask = padded_batch()
    want = greedy_generate(model, ids, mask, 12)
    got = FastGenerator(model).generate(ids, mask, max_new_tokens=12).tokens
    assert torch.equal(got, want)
