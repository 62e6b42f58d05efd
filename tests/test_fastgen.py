"""fastgen: static-cache generation gives generate()'s greedy tokens, with timings."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from tiny_models import VOCAB_SIZE as V
from tiny_models import randomise_bypass, tiny_model

from cqil_cli.runtime.checkpoint import build_cqil_model
from cqil_cli.runtime.fastgen import FastGenerator, fast_generate


def tiny(kind: str, seed: int = 0):
    """A tiny random model (tests/tiny_models.py) whose generate() runs to max_new_tokens."""
    return tiny_model(kind, seed, stop_at_eos=False)


def padded_batch():
    return tiny_models.padded_batch(V, lengths=(11, 7, 4))


def greedy_generate(model, ids, mask, n):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("kind,groups,distance", [
    ("llama-gqa", "none", 0),
    ("llama-gqa", "1-2,3-4", 1),
    ("mistral-one-kv", "0-1,2-4,5-6", 2),
    ("qwen3-qknorm", "0-3", 3),
])
def test_fastgen_greedy_equals_generate(kind, groups, distance):
    model = build_cqil_model(tiny(kind), groups, distance)
    randomise_bypass(model, low=0.6, high=1.2)
    ids, mask = padded_batch()
    want = greedy_generate(model, ids, mask, 12)
    result = FastGenerator(model).generate(ids, mask, max_new_tokens=12)
    assert torch.equal(result.tokens, want)
    assert torch.equal(result.sequences[:, : ids.shape[1]], ids)
    assert result.prefill_s > 0 and len(result.decode_s) == 11 and all(t > 0 for t in result.decode_s)
    assert result.decode_ms_per_token > 0


@pytest.mark.parametrize("kind", ["llama-gqa", "gemma2-softcap", "gemma3-local"])
def test_fastgen_head_is_the_models_head_in_bfloat16(kind):
    """Fast generation's final norm, lm_head and soft-cap are every engine's
    (edges_cqil.final_logits): Gemma's final norm in fp32 there too. bf16 tolerance 1e-2."""
    model = build_cqil_model(tiny(kind), "1-2", 1).to(torch.bfloat16)
    ids = torch.randint(3, V, (2, 9))
    gen = FastGenerator(model)
    gen._lm_matrix()
    with torch.no_grad():
        x, context = model.model.prepare_steps(ids)
        h = model.model.run_steps(x, context)[:, -1]  # [B, d] before the final norm
        got = gen._logits(h).float()
        want = model.compute_logits(model.model.norm(h)).float()
    assert tiny_models.rel(got, want) < 1e-2


def test_fastgen_plain_model_is_converted_and_matches_transformers():
    hf = tiny("llama-gqa")
    ids, mask = padded_batch()
    want = greedy_generate(hf, ids, mask, 10)
    gen = FastGenerator(hf)  # converted with every layer a single step
    assert type(gen.model).__name__ == "CqilForCausalLM" and gen.model.config.num_steps == 5
    assert torch.equal(gen.generate(ids, mask, max_new_tokens=10).tokens, want)


def test_fastgen_reuses_its_cache_and_handles_batch_one():
    model = build_cqil_model(tiny("qwen3-qknorm"), "1-2", 1)
    gen = FastGenerator(model)
    ids = torch.randint(1, V, (1, 9))
    first = gen.generate(ids, max_new_tokens=8).tokens
    cache = gen._cache
    second = gen.generate(ids, max_new_tokens=8).tokens
    assert gen._cache is cache and torch.equal(first, second)
    assert torch.equal(first, greedy_generate(model, ids, torch.ones_like(ids), 8))


def test_fastgen_stops_at_eos_like_generate():
    model = build_cqil_model(tiny("llama-gqa"), "0-1", 1)
    ids, mask = padded_batch()
    free = FastGenerator(model).generate(ids, mask, max_new_tokens=10).tokens
    eos = int(free[1, 3])  # a token sequence 1 emits: it must stop there
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    got = FastGenerator(model).generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0).tokens
    assert torch.equal(got, want)


def test_fastgen_sampling_is_seeded():
    model = build_cqil_model(tiny("mistral-one-kv"), "1-2", 1)
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=10, seed=123)
    a = fast_generate(model, ids, mask, **kw).tokens
    b = fast_generate(model, ids, mask, **kw).tokens
    assert torch.equal(a, b) and a.shape == (3, 8) and int(a.max()) < V


def test_fastgen_rejects_zero_tokens():
    with pytest.raises(ValueError, match="max_new_tokens"):
        FastGenerator(build_cqil_model(tiny("llama-gqa"), "none", 0)).generate(torch.ones(1, 3, dtype=torch.long), None, 0)


def test_fastgen_layer_skipping_equals_generate():
    model = build_cqil_model(tiny("mistral-one-kv"), "1-2", 1, skip_layers=[3, 5])
    ids, mask = padded_batch()
    want = greedy_generate(model, ids, mask, 12)
    got = FastGenerator(model).generate(ids, mask, max_new_tokens=12).tokens
    assert torch.equal(got, want)


@pytest.mark.parametrize("weights", [None, "int4"])
def test_compiled_decode_is_one_graph_and_equals_eager(weights):
    """compile=True: the decode step compiles without a graph break (a break made torch.compile
    give up on the rest of the step, which then ran eagerly) and gives the eager greedy tokens,
    for a grouped model dense and with int4 weights."""
    model = build_cqil_model(tiny("llama-gqa"), "1-2,3-4", 1)
    randomise_bypass(model, low=0.6, high=1.2)
    if weights:
        from cqil_cli.calibrate.quantize import quantize_model
        from cqil_cli.runtime.quant_cqil import WeightScheme

        quantize_model(model, WeightScheme(weights, 32))
    model.eval()
    ids, mask = padded_batch()
    want = FastGenerator(model).generate(ids, attention_mask=mask, max_new_tokens=6).tokens
    from torch._dynamo.utils import counters

    counters.clear()
    got = FastGenerator(model, compile=True).generate(ids, attention_mask=mask, max_new_tokens=6).tokens
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(got, want)


def test_compiled_decode_runs_bfloat16_without_prepacked_weights():
    """compile=True in bf16 on a CPU: the steps are built without oneDNN-prepacked weights
    (inductor cannot trace them: compiling failed), and the tokens are the eager ones within
    bf16 (compared over the first tokens, where a near-tie is unlikely)."""
    model = build_cqil_model(tiny("llama-gqa"), "1-2,3-4", 1).to(torch.bfloat16)
    model.eval()
    ids, mask = padded_batch()
    want = FastGenerator(model).generate(ids, attention_mask=mask, max_new_tokens=3).tokens
    got = FastGenerator(model, compile=True).generate(ids, attention_mask=mask, max_new_tokens=3).tokens
    assert not any(lin.packed for step in model.model.fused_steps() for m in (step.qkv, step.o)
                   for lin in ([m.single] if m.single else m.each or []))
    assert (got == want).float().mean() >= 0.8
