"""Gemma 2, Gemma 3 (text) and Phi-3 on cqil's runtime (runtime/families_cqil.py).

(a) every layer single = transformers, prefill and decode; (b) a group = the formula of
docs/runtime.md (families) assembled from transformers' own layer modules; (c) fused =
reference for groups of 2-4, bypass 0-3, groups that mix sliding and global layers; (d) cached =
uncached greedy tokens, fast generation too; (e) save -> load without cqil
(trust_remote_code=True); (f) `cqil convert` for the cqil, skip and prune strategies.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_cqil
from test_modeling import _compare_engines as compare_engines
from tiny_models import OTHER_FAMILIES, VOCAB_SIZE, padded_batch, randomise_bypass, rel, tiny_model
from transformers import DynamicCache

from cqil_cli.runtime.checkpoint import build_cqil_model, load_converted, save_converted

REL_TOL = 1e-5  # fp32, max |difference| / max |reference|


def tiny_hf(kind: str):
    return tiny_model(kind, stop_at_eos=False)


# --------------------------------------------------------------------------- (a) == transformers


@pytest.mark.parametrize("kind", OTHER_FAMILIES)
@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_all_singles_equal_transformers(kind, engine):
    hf = tiny_hf(kind)
    model = build_cqil_model(hf, "none", 0)
    model.set_engine(engine)
    ids, mask = padded_batch()  # 12 positions: longer than every window (6, 8)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        real = mask.bool()  # padding rows are don't-care
        assert rel(model(ids, attention_mask=mask).logits[real],
                   hf(ids, attention_mask=mask).logits[real]) < REL_TOL
    assert torch.equal(got.sequences, want.sequences)
    for step, (g, w) in enumerate(zip(got.logits, want.logits, strict=True)):  # prefill, decode
        assert rel(g, w) < REL_TOL, f"step {step}"


# --------------------------------------------------------------------------- (b) the formula


def formula_forward(hf, model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `model`'s grouping computed with the transformers model's own layers:
    a_j = Na_j(A_j(N1_j(x))), m_j = Nf_j(F_j(N2_j(x + a_j + b_j))), y = x + Σ γ_j (a_j + m_j)
    (Na = Nf = identity and N2 = post_attention_layernorm for Phi-3 and Granite; N1 = N2 =
    identity for OLMo 2; Granite: both deltas times its residual multiplier r, embeddings times
    its embedding multiplier, logits divided by logits_scaling)."""
    cfg, T = hf.config, ids.shape[1]
    inner = hf.model
    r = getattr(cfg, "residual_multiplier", 1.0)
    x = inner.embed_tokens(ids) * getattr(cfg, "embedding_multiplier", 1.0)
    pos = torch.arange(T)[None]
    i = torch.arange(T)
    masks = {}
    for kind in set(getattr(cfg, "layer_types", None) or ["sliding_attention"]):
        allowed = i[None, :] <= i[:, None]
        if kind == "sliding_attention" and getattr(cfg, "sliding_window", None) is not None:
            allowed &= i[None, :] > i[:, None] - cfg.sliding_window
        masks[kind] = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))[None, None]

    def rope(kind):
        if cfg.model_type == "gemma3_text":
            return inner.rotary_emb(x, pos, kind)
        return inner.rotary_emb(x, pos)

    def kind_of(li):
        return cfg.layer_types[li] if getattr(cfg, "layer_types", None) else "sliding_attention"

    def attention(li, x):
        layer = inner.layers[li]
        n1 = getattr(layer, "input_layernorm", torch.nn.Identity())  # OLMo 2: none
        o = layer.self_attn(n1(x), position_embeddings=rope(kind_of(li)),
                            attention_mask=masks[kind_of(li)])[0]
        post_norms = hasattr(layer, "post_feedforward_layernorm")  # Gemma, OLMo 2
        return (layer.post_attention_layernorm(o) if post_norms else o) * r

    def mlp(li, u):
        layer = inner.layers[li]
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma
            return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(u)))
        if hasattr(layer, "post_feedforward_layernorm"):  # OLMo 2
            return layer.post_feedforward_layernorm(layer.mlp(u))
        return layer.mlp(layer.post_attention_layernorm(u)) * r

    ours = dict(model.named_parameters())
    D = model.config.bypass_distance
    for group in model.config.groups:
        if len(group) == 1:
            h = x + attention(group[0], x)
            x = h + mlp(group[0], h)
            continue
        a = [attention(li, x) for li in group]
        y = x
        for j, li in enumerate(group):
            b = torch.zeros_like(x)
            for k in range(max(0, j - D), j):
                beta = ours[f"model.layers.{li}.cqil_beta"]  # row r <-> k = j - rows + r
                b = b + beta[k - (j - beta.shape[0])] * a[k]
            y = y + ours[f"model.layers.{li}.cqil_gamma"] * (a[j] + mlp(li, x + a[j] + b))
        x = y
    logits = hf.lm_head(inner.norm(x)) / getattr(cfg, "logits_scaling", 1.0)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@pytest.mark.parametrize("kind", OTHER_FAMILIES)
@pytest.mark.parametrize("distance", [0, 2])
def test_reference_matches_formula(kind, distance):
    hf = tiny_hf(kind)
    model = build_cqil_model(hf, "1-3", distance)  # mixes sliding and global layers in Gemma
    randomise_bypass(model, seed=5)
    model.set_engine("reference")
    ids = torch.randint(3, VOCAB_SIZE, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel(model(ids).logits, formula_forward(hf, model, ids)) < REL_TOL


# --------------------------------------------------------------------------- (c) fused == reference


@pytest.mark.parametrize("kind", OTHER_FAMILIES)
@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("distance", [0, 1, 2, 3])
def test_fused_matches_reference(kind, size, distance):
    hf = tiny_hf(kind)
    n = hf.config.num_hidden_layers
    # a group of `size` from layer 1 (mixed attention types in Gemma), a second one after it
    spec = f"1-{size}" + (f",{size + 1}-{min(n - 1, size + 2)}" if size + 2 < n else "")
    model = build_cqil_model(hf, spec, distance)
    randomise_bypass(model, seed=distance)
    compare_engines(model)  # prefill of a left-padded batch and 4 decode steps, within 1e-5


def test_fused_gemma_in_bfloat16_is_close():
    """bf16 (on CPU: oneDNN's prepacked weights where available, P separate calls)."""
    hf = tiny_hf("gemma2-softcap")
    model = build_cqil_model(hf, "1-2,3-4", 1).to(torch.bfloat16)
    ids, mask = padded_batch()
    with torch.no_grad():
        model.set_engine("reference")
        want = model(ids, attention_mask=mask).logits.float()
        model.set_engine("fused")
        got = model(ids, attention_mask=mask).logits.float()
    assert rel(got[mask.bool()], want[mask.bool()]) < 3e-2


@pytest.mark.parametrize("kind", ["gemma2-softcap", "phi3-partial"])
def test_fused_per_member_calls_match_reference(kind, monkeypatch):
    """The group path for prepacked weights (P calls instead of bmm, taken with oneDNN bf16 on
    CPUs that have it), forced here with dense fp32 weights."""
    from cqil_cli.runtime import fused_cqil

    def dense(self, w, bias=None):
        self.packed, self.w, self.bias = False, fused_cqil._matrix(w), bias

    monkeypatch.setattr(fused_cqil.FusedLinear, "packs", staticmethod(lambda w: True))
    monkeypatch.setattr(fused_cqil.FusedLinear, "__init__", dense)
    model = build_cqil_model(tiny_hf(kind), "1-3", 2)
    randomise_bypass(model)
    ids, mask = padded_batch()
    with torch.no_grad():
        model.set_engine("reference")
        want = model(ids, attention_mask=mask).logits
        model.set_engine("fused")
        got = model(ids, attention_mask=mask).logits
        assert not model.model.fused_steps()[1].batched
    assert rel(got[mask.bool()], want[mask.bool()]) < REL_TOL


def test_gemma_embeddings_scale_in_their_dtype():
    """sqrt(64) = 8 is exact; sqrt(3072) = 55.4256 becomes 55.5 in bfloat16, as transformers."""
    from cqil_cli.runtime.families_cqil import embedding_multiplier

    assert embedding_multiplier(3072, torch.bfloat16) == 55.5
    assert embedding_multiplier(3072, torch.float32) == float(torch.tensor(3072 ** 0.5))


# --------------------------------------------------------------------------- (d) generation


@pytest.mark.parametrize("kind", OTHER_FAMILIES)
def test_cached_equals_uncached_and_fastgen(kind):
    from cqil_cli.runtime.fastgen import FastGenerator

    model = build_cqil_model(tiny_hf(kind), "1-2,3-4", 1)
    randomise_bypass(model)
    ids, mask = padded_batch()
    greedy = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        cached = model.generate(ids, **greedy)
        uncached = model.generate(ids, use_cache=False, **greedy)
    fast = FastGenerator(model).generate(ids, mask, max_new_tokens=10)
    assert torch.equal(cached, uncached)
    assert torch.equal(fast.tokens, cached[:, ids.shape[1]:])


@pytest.mark.parametrize("kind", ["gemma2-softcap", "gemma3-local"])
@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_skip_layers_one_pass_equals_cached_generation(kind, engine):
    """Unified Layer Skipping on alternating sliding / global layers: the `prompt_length`
    one-pass evaluation equals cached generation, and fast generation equals generate()."""
    from cqil_cli.runtime.fastgen import FastGenerator

    hf = tiny_hf(kind)
    groups = [[0], [1, 2]] + [[i] for i in range(3, hf.config.num_hidden_layers)]
    model = build_cqil_model(hf, groups, 1, skip_layers=[3])
    randomise_bypass(model)
    model.set_engine(engine)
    ids, mask = padded_batch()
    p = 8
    with torch.no_grad():
        cache = DynamicCache()
        steps = [model(ids[:, :p], attention_mask=mask[:, :p], past_key_values=cache).logits]
        for i in range(p, ids.shape[1]):
            steps.append(model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache).logits)
        one_pass = model(ids, attention_mask=mask, prompt_length=p).logits
        real = mask.bool()
        assert rel(one_pass[real], torch.cat(steps, dim=1)[real]) < REL_TOL
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(FastGenerator(model).generate(ids, mask, max_new_tokens=8).tokens,
                       greedy[:, ids.shape[1]:])


@pytest.mark.parametrize("kind", OTHER_FAMILIES)
def test_fastgen_of_a_plain_model_equals_transformers(kind):
    from cqil_cli.runtime.fastgen import FastGenerator

    hf = tiny_hf(kind)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    fast = FastGenerator(hf).generate(ids, mask, max_new_tokens=8)
    assert torch.equal(fast.tokens, want[:, ids.shape[1]:])


# --------------------------------------------------------------------------- (e) save -> load


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory):
    from tiny_models import offline_tokenizer

    out = {}
    for kind in OTHER_FAMILIES:
        model = build_cqil_model(tiny_hf(kind), "1-2,3-4", 1)
        randomise_bypass(model)
        out[kind] = (model, save_converted(model, offline_tokenizer(), tmp_path_factory.mktemp(kind) / "conv"))
    return out


def test_saved_phi3_keeps_fused_tensor_names(saved_families):
    from safetensors import safe_open

    _, folder = saved_families["phi3-partial"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in keys
    assert "model.layers.0.mlp.gate_up_proj.weight" in keys
    assert not any(k.endswith(("q_proj.weight", "gate_proj.weight")) for k in keys)
    assert (folder / "families_cqil.py").is_file()


def test_roundtrip_with_cqil_classes(saved_families):
    ids = torch.randint(3, VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(2))
    for kind, (model, folder) in saved_families.items():
        loaded = load_converted(folder)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits), kind


def test_load_with_trust_remote_code_without_cqil(saved_families, tmp_path):
    """A user without cqil: only transformers + the runtime files shipped in each folder."""
    ids = [[5, 9, 17, 33, 70, 41, 12, 99, 3, 8]]
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    want = {}
    with torch.no_grad():
        for kind, (model, _) in saved_families.items():
            want[kind] = (model(torch.tensor(ids)).logits[0, -1].tolist(),
                          model.generate(torch.tensor(ids), **greedy)[0, len(ids[0]):].tolist())
    folders = {kind: str(folder) for kind, (_, folder) in saved_families.items()}
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        out = {{}}
        for kind, folder in {folders!r}.items():
            m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
            with torch.no_grad():
                tokens = m.generate(torch.tensor({ids}), **{greedy!r})[0, {len(ids[0])}:].tolist()
                out[kind] = [type(m).__name__, m(torch.tensor({ids})).logits[0, -1].tolist(), tokens]
        assert not any(name.startswith("cqil_cli") for name in sys.modules), "cqil_cli was imported"
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))  # no writes to ~
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind, (logits, tokens) in want.items():
        name, their_logits, their_tokens = got[kind]
        assert name == "CqilForCausalLM", kind
        assert rel(torch.tensor(their_logits), torch.tensor(logits)) < REL_TOL, kind
        assert their_tokens == tokens, kind


# --------------------------------------------------------------------------- (f) cqil convert


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(600)))  # ~11 windows of 256 bytes
    return path


STRATEGIES = {
    "cqil": ["--groups", "1-2", "--bypass", "1"],
    "skip": ["--strategy", "skip", "--steps", "3"],
    "prune": ["--strategy", "prune", "--steps", "3"],
}


@pytest.mark.parametrize("kind", OTHER_FAMILIES)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_convert_each_strategy(kind, strategy, short_text, tmp_path, tokenizer_dir):
    from tiny_models import save_tiny

    from cqil_cli.inputs.models import load_model
    from cqil_cli.runtime.manifest import read_manifest

    base = save_tiny(kind, tmp_path / "base", tokenizer_dir=tokenizer_dir)
    out = tmp_path / "out"
    result = run_cqil("convert", base, "--out", out, *STRATEGIES[strategy], "--tune-steps", "0",
                      "--calib", short_text, "--eval", short_text, "--device", "cpu")
    assert result.code == 0, result.err[-2000:]
    manifest = read_manifest(out)
    assert manifest.strategy == strategy
    loaded = load_model(str(out))
    if strategy == "prune":  # a plain base-architecture model with 3 layers
        assert loaded.model_type == tiny_hf(kind).config.model_type and loaded.num_layers == 3
    else:
        assert loaded.model_type == "cqil" and loaded.model.config.base_model_type == \
            tiny_hf(kind).config.model_type
    assert manifest.quality["ppl_untuned"] > 0
    ids = torch.randint(3, VOCAB_SIZE, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(loaded.model(ids).logits).all()


@pytest.mark.parametrize("kind", OTHER_FAMILIES)
def test_tuning_teacher_is_the_models_own_forward(kind):
    """The tuning teacher (every group run in sequence) of an all-singles model is the model's
    forward, Gemma 2's final soft-cap included; and so is the student."""
    from cqil_cli.calibrate.tuning import teacher_and_student

    model = build_cqil_model(tiny_hf(kind), "none", 0)
    ids = torch.randint(3, VOCAB_SIZE, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        teacher, student = teacher_and_student(model, ids)
    assert rel(teacher, want) < REL_TOL and rel(student, want) < REL_TOL
