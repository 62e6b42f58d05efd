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
from tiny_models import VOCAB_SIZE as V
from tiny_models import offline_tokenizer, randomise_bypass, rel, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from cqil_cli.core.errors import CqilError
from cqil_cli.runtime.checkpoint import (
    RUNTIME_FILES,
    build_cqil_model,
    load_converted,
    parse_groups,
    register_auto_classes,
    save_converted,
)
from cqil_cli.runtime.manifest import Manifest, read_manifest, verify_folder, write_manifest
from cqil_cli.runtime.modeling_cqil import CqilForCausalLM

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
    hf = tiny_model("llama-gqa")
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
    model = build_cqil_model(tiny_model("llama-gqa"), "1-2,3-4", 1)
    randomise_bypass(model)
    out = save_converted(model, offline_tokenizer(), tmp_path / "conv")
    return model, out


def test_saved_folder_layout(saved):
    model, out = saved
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "configuration_cqil.py",
            "modeling_cqil.py", "fused_cqil.py", "tokenizer.json"} <= names
    assert "manifest.json" not in names  # convert's export writes it (runtime/manifest.py)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left over
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "cqil" and config["base_model_type"] == "llama"
    assert config["groups"] == [[0], [1, 2], [3, 4]] and config["bypass_distance"] == 1
    assert config["auto_map"] == {"AutoConfig": "configuration_cqil.CqilConfig",
                                  "AutoModelForCausalLM": "modeling_cqil.CqilForCausalLM"}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "model.layers.2.cqil_beta" in keys
    assert "model.layers.1.cqil_gamma" in keys and "model.layers.1.cqil_beta" not in keys
    assert "lm_head.weight" not in keys  # tied to the embeddings, stored once


def test_manifest_lists_every_file_and_refuses_a_changed_one(saved):
    _, out = saved
    manifest = Manifest(cqil_version="0", strategy="cqil", base_model={"name": "tiny"},
                        steps=[[0], [1, 2], [3, 4]], num_steps=3, num_layers=5,
                        bypass_distance=1, devices=2, placement={}, predicted={}, quality={},
                        calibration={}, tuning={}, grouping={})
    written = write_manifest(out, manifest)
    data = json.loads((out / "manifest.json").read_text())
    assert data["schema"] == "cqil.manifest/1"
    assert set(written.files) == {p.name for p in out.iterdir()} - {"manifest.json"}
    assert read_manifest(out) == written
    verify_folder(out)
    with open(out / "model.safetensors", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(CqilError, match="model.safetensors was changed or truncated"):
        verify_folder(out)


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
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits[0, -1].tolist()
        want_tokens = model.generate(torch.tensor(ids), **greedy)[0, len(ids[0]):].tolist()
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert not any(name.startswith("cqil_cli") for name in sys.modules), "cqil_cli was imported"
        with torch.no_grad():
            tokens = m.generate(torch.tensor({ids}), **{greedy!r})[0, {len(ids[0])}:].tolist()
            print(json.dumps([type(m).__name__, m(torch.tensor({ids})).logits[0, -1].tolist(), tokens]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))  # no writes to ~
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, got, tokens = json.loads(proc.stdout.strip().splitlines()[-1])
    assert name == "CqilForCausalLM"
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert tokens == want_tokens  # generate() through the shipped files keeps the cache


def test_save_refuses_existing_folder_and_cleans_up_on_failure(tmp_path):
    model = build_cqil_model(tiny_model("llama-gqa", tie_word_embeddings=False), "0-1", 0)
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
    hf = tiny_model("qwen2-bias", stop_at_eos=False)  # generate() runs 5 tokens
    fp32 = build_cqil_model(hf, "0-1,2-3", 1)
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
            assert rel(got, want) < 5e-2
        out_ids = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out_ids.shape == (2, 14)


def test_saved_folder_carries_the_distributed_engine(saved, tmp_path):
    """The folder's own sharding_cqil.py / distributed_cqil.py, imported as a package by a
    process that never imports cqil_cli, plan the layout on 2 ranks and read each rank's
    slices from the folder: the same tensors as cqil's own code reads."""
    import shutil

    from cqil_cli.runtime.distributed_cqil import load_rank

    _, out = saved
    package = tmp_path / "shipped" / "cqil_runtime"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in RUNTIME_FILES:
        shutil.copyfile(out / name, package / name)
    script = f"""
import sys, torch
from cqil_runtime.distributed_cqil import load_rank
for rank in (0, 1):
    shard = load_rank({str(out)!r}, rank, 2)
    torch.save(shard.state_dict(), {str(tmp_path)!r} + f"/rank{{rank}}.pt")
assert not [m for m in sys.modules if m.startswith("cqil_cli")]
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "shipped",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        want = load_rank(out, rank, 2).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
