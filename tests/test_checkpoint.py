"""Converted checkpoints: group specs, conversion checks, save/load (also without cqil), bf16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from cqil_cli.runtime.checkpoint import (
    build_cqil_model,
    load_converted,
    parse_groups,
    register_auto_classes,
    save_converted,
)
from cqil_cli.runtime.modeling_cqil import CqilForCausalLM

V = 128


def tiny_llama(tied: bool = True):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         tie_word_embeddings=tied))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model.eval()


def tiny_tokenizer():
    """A word-level tokenizer built offline (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def randomise_bypass(model):
    with torch.no_grad():
        for layer in model.model.layers:
            for p in (layer.cqil_gamma, layer.cqil_beta):
                if p is not None:
                    p.uniform_(0.5, 1.5)


# --------------------------------------------------------------------------- parse_groups


def test_parse_groups():
    assert parse_groups("none", 4) == [[0], [1], [2], [3]]
    assert parse_groups("1-2", 4) == [[0], [1, 2], [3]]
    assert parse_groups(" 2-3 , 0-1 ", 4) == [[0, 1], [2, 3]]
    assert parse_groups("0-2,3", 5) == [[0, 1, 2], [3], [4]]


@pytest.mark.parametrize("spec,message", [
    ("1-2,2-3", "overlap"),
    ("3-5", "out of range"),
    ("2-1", "before start"),
    ("1-", "bad group"),
    ("a-b", "bad group"),
    ("1-2,,3", "bad group"),
])
def test_parse_groups_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_groups(spec, 5)


# --------------------------------------------------------------------------- build_cqil_model


def test_convert_rejects_unsupported_architecture():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        build_cqil_model(gpt2, "none", 0)


def test_convert_copies_weights_and_initialises_bypass_to_one():
    hf = tiny_llama()
    model = build_cqil_model(hf, "0-1,2-4", 2)
    ours, theirs = model.state_dict(), hf.state_dict()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    assert torch.equal(model.model.layers[4].cqil_beta, torch.ones(2, 64))
    assert torch.equal(model.model.layers[0].cqil_gamma, torch.ones(64))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    # untrained group = the authors' concurrent computation; the model must differ from the base
    ids = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, hf(ids).logits)


# --------------------------------------------------------------------------- save / load


@pytest.fixture()
def saved(tmp_path):
    model = build_cqil_model(tiny_llama(), "1-2,3-4", 1)
    randomise_bypass(model)
    out = save_converted(model, tiny_tokenizer(), tmp_path / "conv", manifest_extra={"schema": 1})
    return model, out


def test_saved_folder_layout(saved):
    model, out = saved
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "modeling_cqil.py",
            "manifest.json", "tokenizer.json"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left over
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "cqil" and config["base_model_type"] == "llama"
    assert config["groups"] == [[0], [1, 2], [3, 4]] and config["bypass_distance"] == 1
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cqil.CqilForCausalLM"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "model.layers.2.cqil_beta" in keys
    assert "model.layers.1.cqil_gamma" in keys and "model.layers.1.cqil_beta" not in keys
    assert "lm_head.weight" not in keys  # tied to the embeddings, stored once
    assert json.loads((out / "manifest.json").read_text()) == {"schema": 1}


def test_roundtrip_with_cqil_classes(saved):
    model, out = saved
    register_auto_classes()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, CqilForCausalLM)
    again = load_converted(out, engine="reference")
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(loaded(ids).logits, want)
        assert torch.allclose(again(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_load_with_trust_remote_code_without_cqil(saved, tmp_path):
    """A user without cqil: only transformers + the modeling file shipped in the folder."""
    model, out = saved
    ids = [[5, 9, 17, 33, 2, 70]]
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits[0, -1].tolist()
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert not any(name.startswith("cqil_cli") for name in sys.modules), "cqil_cli was imported"
        with torch.no_grad():
            print(json.dumps([type(m).__name__, m(torch.tensor({ids})).logits[0, -1].tolist()]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert name == "CqilForCausalLM"
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_save_refuses_existing_folder_and_cleans_up_on_failure(tmp_path):
    model = build_cqil_model(tiny_llama(tied=False), "0-1", 0)
    out = save_converted(model, None, tmp_path / "conv")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in set(f.keys())  # untied head is stored
    with pytest.raises(FileExistsError):
        save_converted(model, None, out)

    class Broken:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_converted(model, Broken(), tmp_path / "other")
    with pytest.raises(RuntimeError, match="disk full"):
        save_converted(model, Broken(), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]  # old folder intact, no leftovers
    assert (out / "model.safetensors").exists()
    save_converted(model, None, out, overwrite=True)


def test_bf16_smoke(tmp_path):
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    fp32 = build_cqil_model(hf.eval(), "0-1,2-3", 1)
    out = save_converted(build_cqil_model(hf.to(torch.bfloat16).eval(), "0-1,2-3", 1), None, tmp_path / "bf16")
    model = load_converted(out, dtype="bf16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        want = fp32(ids).logits
        for engine in ("fused", "reference"):
            model.set_engine(engine)
            got = model(ids).logits.float()
            assert torch.isfinite(got).all()
            assert ((got - want).abs().max() / want.abs().max()).item() < 5e-2
        out_ids = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out_ids.shape == (2, 14)
