"""The CQIL model: equality with transformers, fused == reference == the formula, generate()."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB_SIZE as V
from tiny_models import padded_batch, randomise_bypass, rel, tiny_model
from transformers import DynamicCache, LlamaConfig

from cqil_cli.runtime.checkpoint import build_cqil_model
from cqil_cli.runtime.modeling_cqil import CqilConfig, CqilForCausalLM

REL_TOL = 1e-5  # fp32, max |difference| / max |reference|

# The tiny models of tests/tiny_models.py this file covers: every architecture and attention
# layout (GQA, every bias, one kv head + sliding window, q/k/v biases, q/k norms).
KINDS = ("llama-gqa", "llama-bias", "mistral-one-kv", "qwen2-bias", "qwen3-qknorm")


def tiny_hf(kind: str, seed: int = 0):
    """A tiny random transformers model whose generate() always runs to max_new_tokens."""
    return tiny_model(kind, seed, stop_at_eos=False)


# --------------------------------------------------------------------------- (a) == transformers


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_all_singles_equal_transformers(kind, engine):
    hf = tiny_hf(kind)
    model = build_cqil_model(hf, "none", 0)
    model.set_engine(engine)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf_cache, our_cache = DynamicCache(config=hf.config), DynamicCache()
        want = hf(ids, past_key_values=hf_cache).logits
        got = model(ids, past_key_values=our_cache).logits
        assert rel(got, want) < REL_TOL
        for step in range(4):  # decode steps through the caches
            nxt = torch.randint(0, V, (2, 1), generator=torch.Generator().manual_seed(10 + step))
            want = hf(nxt, past_key_values=hf_cache).logits
            got = model(nxt, past_key_values=our_cache).logits
            assert rel(got, want) < REL_TOL, f"decode step {step}"
    assert len(our_cache.layers) == hf.config.num_hidden_layers  # one entry per step


def test_all_singles_equal_transformers_with_padding():
    hf = tiny_hf("llama-gqa")
    model = build_cqil_model(hf, "none", 0)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()  # padding rows are don't-care
    assert rel(got[real], want[real]) < REL_TOL


# --------------------------------------------------------------------------- (b) fused == reference

GROUPINGS = {  # for the 7-layer models: group sizes 1..4
    "pairs": [[0], [1, 2], [3, 4], [5, 6]],
    "mixed": [[0, 1, 2], [3], [4, 5], [6]],
    "four": [[0, 1, 2, 3], [4, 5, 6]],
}


@pytest.mark.parametrize("kind", ["mistral-one-kv", "qwen3-qknorm"])
@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
@pytest.mark.parametrize("distance", [0, 1, 2, 3])
def test_fused_matches_reference(kind, grouping, distance):
    model = build_cqil_model(tiny_hf(kind), GROUPINGS[grouping], distance)
    randomise_bypass(model, seed=distance)
    _compare_engines(model)


@pytest.mark.parametrize("kind", ["llama-bias", "qwen2-bias"])
def test_fused_matches_reference_with_biases(kind):
    model = build_cqil_model(tiny_hf(kind), [[0, 1], [2, 3, 4]], 2)
    randomise_bypass(model)
    _compare_engines(model)


def _compare_engines(model: CqilForCausalLM) -> None:
    """Prefill of a left-padded batch, then 4 decode steps, on both engines."""
    ids, mask = padded_batch()
    caches, logits = {}, {}
    with torch.no_grad():
        for engine in ("reference", "fused"):
            model.set_engine(engine)
            caches[engine] = DynamicCache()
            logits[engine] = model(ids, attention_mask=mask, past_key_values=caches[engine]).logits
        real = mask.bool()
        assert rel(logits["fused"][real], logits["reference"][real]) < REL_TOL
        for step in range(4):
            nxt = torch.randint(1, V, (ids.shape[0], 1), generator=torch.Generator().manual_seed(step))
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            for engine in ("reference", "fused"):
                model.set_engine(engine)
                logits[engine] = model(nxt, attention_mask=mask, past_key_values=caches[engine]).logits
            assert rel(logits["fused"], logits["reference"]) < REL_TOL, f"decode step {step}"


def test_fused_weights_follow_parameter_updates():
    model = build_cqil_model(tiny_hf("llama-gqa"), [[0, 1], [2, 3, 4]], 1)
    ids = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
        model.model.layers[3].cqil_gamma.mul_(0.5)  # in place: the fused weights must notice
        after = model(ids).logits
        model.set_engine("reference")
        want = model(ids).logits
    assert rel(before, after) > 1e-3
    assert rel(after, want) < REL_TOL


# --------------------------------------------------------------------------- (c) reference == §2


def formula_forward(model: CqilForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """docs/method.md written out with plain tensor ops (no cache, no padding): logits [B, T, V]."""
    cfg = model.config
    sd = dict(model.state_dict())
    H, G, hd, eps, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.bypass_distance
    B, T = ids.shape

    def w(name):
        return sd[name]

    def lin(x, prefix):
        return x @ w(prefix + ".weight").T + (sd[prefix + ".bias"] if prefix + ".bias" in sd else 0)

    def rms(x, weight):
        return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    theta = cfg.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(T).float()[:, None] * inv[None]  # [T, hd/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rope(t):  # [B, heads, T, hd]
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    allowed = torch.ones(T, T).tril().bool()
    if cfg.sliding_window is not None:
        i = torch.arange(T)
        allowed &= (i[None, :] > i[:, None] - cfg.sliding_window)

    def attention(li, x):  # A_l(N1_l(x)) -> [B, T, d]
        p = f"model.layers.{li}."
        h = rms(x, w(p + "input_layernorm.weight"))
        q = lin(h, p + "self_attn.q_proj").view(B, T, H, hd)
        k = lin(h, p + "self_attn.k_proj").view(B, T, G, hd)
        v = lin(h, p + "self_attn.v_proj").view(B, T, G, hd).transpose(1, 2)
        if cfg.qk_norm:
            q, k = rms(q, w(p + "self_attn.q_norm.weight")), rms(k, w(p + "self_attn.k_norm.weight"))
        q, k = rope(q.transpose(1, 2)), rope(k.transpose(1, 2))
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return lin((probs @ v).transpose(1, 2).reshape(B, T, H * hd), p + "self_attn.o_proj")

    def mlp(li, u):  # F_l(N2_l(u))
        p = f"model.layers.{li}."
        h = rms(u, w(p + "post_attention_layernorm.weight"))
        return lin(F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")

    x = w("model.embed_tokens.weight")[ids]
    for group in cfg.groups:
        if len(group) == 1:  # the original layer
            h = x + attention(group[0], x)
            x = h + mlp(group[0], h)
            continue
        a = [attention(li, x) for li in group]
        y = x
        for j, li in enumerate(group):
            b = torch.zeros_like(x)
            for k in range(max(0, j - D), j):
                beta = w(f"model.layers.{li}.cqil_beta")  # row r <-> k = j - rows + r
                b = b + beta[k - (j - beta.shape[0])] * a[k]
            m = mlp(li, x + a[j] + b)
            y = y + w(f"model.layers.{li}.cqil_gamma") * (a[j] + m)
        x = y
    x = rms(x, w("model.norm.weight"))
    return x @ w("lm_head.weight").T


@pytest.mark.parametrize("kind", ["llama-bias", "mistral-one-kv", "qwen3-qknorm"])
@pytest.mark.parametrize("distance", [0, 1, 3])
def test_reference_matches_formula(kind, distance):
    hf = tiny_hf(kind)
    n = hf.config.num_hidden_layers
    groups = [[0, 1, 2, 3]] + [[i] for i in range(4, n)]  # one group of 4 + singles
    if n == 7:
        groups = [[0, 1, 2, 3], [4], [5, 6]]
    model = build_cqil_model(hf, groups, distance)
    randomise_bypass(model, seed=5)
    model.set_engine("reference")
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = model(ids).logits
        want = formula_forward(model, ids)
    assert rel(got, want) < REL_TOL


def test_reference_is_differentiable():
    model = build_cqil_model(tiny_hf("qwen2-bias"), [[0, 1], [2, 3, 4]], 2)
    model.train()
    ids = torch.randint(0, V, (2, 8))
    loss = model(ids, labels=ids).loss
    loss.backward()
    layer = model.model.layers[4]
    for p in (layer.cqil_gamma, layer.cqil_beta, layer.self_attn.q_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


# --------------------------------------------------------------------------- (d) generate()


@pytest.fixture(scope="module")
def grouped_mistral():
    model = build_cqil_model(tiny_hf("mistral-one-kv"), [[0], [1, 2], [3, 4, 5], [6]], 1)
    randomise_bypass(model)
    return model


def test_generate_cache_equals_no_cache(grouped_mistral):
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = grouped_mistral.generate(ids, use_cache=True, **kw)
        uncached = grouped_mistral.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_generate_left_padded_batch_equals_single_sequences(grouped_mistral):
    ids, mask = padded_batch()
    with torch.no_grad():
        batch = grouped_mistral.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        for b in range(ids.shape[0]):
            single = ids[b: b + 1, mask[b].bool()]
            alone = grouped_mistral.generate(single, max_new_tokens=10, do_sample=False, pad_token_id=0)
            assert torch.equal(alone[0, single.shape[1]:], batch[b, ids.shape[1]:]), f"sequence {b}"


def test_generate_singles_equal_transformers_generate():
    hf = tiny_hf("qwen2-bias")
    model = build_cqil_model(hf, "none", 0)
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), hf.generate(ids, **kw))


def test_generate_sampling_runs(grouped_mistral):
    ids, mask = padded_batch()
    torch.manual_seed(0)
    with torch.no_grad():
        out = grouped_mistral.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                                       temperature=0.8, top_k=20, pad_token_id=0)
    assert out.shape == (3, ids.shape[1] + 6)
    assert int(out.max()) < V


# --------------------------------------------------------------------------- config validation


def test_config_validation_messages():
    base = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="consecutive"):
        CqilConfig.from_base_config(base, [[0, 2], [1], [3]], 0)
    with pytest.raises(ValueError, match="cover"):
        CqilConfig.from_base_config(base, [[0, 1], [2]], 0)
    with pytest.raises(ValueError, match="should start at layer"):
        CqilConfig.from_base_config(base, [[1, 2], [0], [3]], 0)
    with pytest.raises(ValueError, match=">= 0"):
        CqilConfig.from_base_config(base, None, -1)
    with pytest.raises(ValueError, match="engine"):
        CqilConfig.from_base_config(base, None, 0, engine="warp")
    with pytest.raises(ValueError, match="the base model is 'gpt2'; cqil runs the families llama, "):
        CqilConfig.from_base_config(type("C", (), {"model_type": "gpt2"})(), None, 0)
    cfg = CqilConfig.from_base_config(base, [[0], [1, 2], [3]], 1)
    assert cfg.num_steps == 3 and cfg.base_model_type == "llama"
    model = CqilForCausalLM(cfg)
    assert model.model.layers[2].cqil_beta.shape == (1, 64)
    assert model.model.layers[1].cqil_beta is None and model.model.layers[0].cqil_gamma is None


# --------------------------------------------------------------------------- the real default model


@pytest.mark.integration
def test_default_model_grouped_cache_equals_no_cache():
    """SmolLM2-135M with pairs 14-15 ... 24-25 and bypass 1: greedy 32 tokens, cache on == off."""
    models = pytest.importorskip("cqil_cli.inputs.models")
    lm = models.load_model("default")
    model = build_cqil_model(lm.model, "14-15,16-17,18-19,20-21,22-23,24-25", 1)
    assert model.config.num_steps == 24
    prompt = lm.tokenizer("The history of the English language begins", return_tensors="pt")
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False,
              pad_token_id=lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id)
    with torch.no_grad():
        cached = model.generate(**prompt, use_cache=True, **kw)
        uncached = model.generate(**prompt, use_cache=False, **kw)
        model.set_engine("reference")
        reference = model.generate(**prompt, use_cache=True, **kw)
    assert cached.shape[1] == prompt["input_ids"].shape[1] + 32
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)


# --------------------------------------------------------------------------- layer skipping (ULS)


@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_skip_layers_prompt_runs_every_layer_and_decoding_skips(engine):
    """The one-pass `prompt_length` evaluation equals cached generation: prompt through every
    layer, later tokens through the kept layers only, on a left-padded batch."""
    hf = tiny_hf("mistral-one-kv")  # 7 layers, one kv head, sliding window 6
    model = build_cqil_model(hf, [[0], [1, 2], [3], [4], [5], [6]], 1, skip_layers=[3, 5])
    randomise_bypass(model)
    model.set_engine(engine)
    ids, mask = padded_batch()  # [3, 12]
    p = 8
    with torch.no_grad():
        plain = build_cqil_model(hf, [[0], [1, 2], [3], [4], [5], [6]], 1)
        randomise_bypass(plain)
        # a fresh forward is a prompt: every layer, like the model without skip_layers
        assert rel(model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits) < REL_TOL
        cache = DynamicCache()
        steps = [model(ids[:, :p], attention_mask=mask[:, :p], past_key_values=cache).logits]
        for i in range(p, ids.shape[1]):
            steps.append(model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache).logits)
        cached = torch.cat(steps, dim=1)
        one_pass = model(ids, attention_mask=mask, prompt_length=p).logits
        real = mask.bool()
        assert rel(one_pass[real], cached[real]) < REL_TOL
        assert rel(one_pass[:, p:], plain(ids, attention_mask=mask).logits[:, p:]) > 1e-2  # layers were skipped
        # a skipped layer's cache entry (step 2 = layer 3) holds the prompt only; step 3 = layer 4 all
        assert cache.layers[2].keys.shape[2] == p and cache.layers[3].keys.shape[2] == ids.shape[1]


def test_skip_layers_validation_and_generate_round_trip(tmp_path):
    hf = tiny_hf("llama-gqa")
    with pytest.raises(ValueError, match="layer 0 always runs"):
        build_cqil_model(hf, None, 0, skip_layers=[0])
    with pytest.raises(ValueError, match="in a group"):
        build_cqil_model(hf, [[0], [1, 2], [3], [4]], 0, skip_layers=[2])
    model = build_cqil_model(hf, None, 0, skip_layers=[2, 3])
    model.save_pretrained(tmp_path / "m")
    again = CqilForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.config.skip_layers == [2, 3]
    ids, mask = padded_batch()
    with torch.no_grad():
        a = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        b = again.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
