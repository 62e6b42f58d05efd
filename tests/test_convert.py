"""`cqil convert` on a tiny model: outputs, manifest, atomicity, tamper refusal, search."""

import json
import os

import pytest
from conftest import assert_clean_error

from cqil_cli.core.errors import CqilError
from cqil_cli.runtime.manifest import read_manifest


def convert_in_process(*args):
    """`cqil convert ARGS` through click in this process (usable from module-scoped fixtures,
    where the function-scoped `cqil` fixture is not)."""
    from click.testing import CliRunner

    from cqil_cli.cli.app import cli

    result = CliRunner().invoke(cli, ["convert", *map(str, args)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def long_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "long.txt"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box".split()
    import random

    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(words) for _ in range(12000)))
    return path


@pytest.fixture(scope="module")
def converted(llama_folder, long_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "out"
    convert_in_process(llama_folder, "--out", out, "--groups", "1-2", "--bypass", "1",
                       "--tune-steps", "2", "--lora-rank", "2", "--calib", long_text, "--eval",
                       long_text, "--device", "cpu")
    return out


def test_output_is_a_complete_hf_folder_with_manifest(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_cqil.py", "manifest.json",
            "README.md", "tokenizer.json", "generation_config.json"} <= names
    raw = json.loads((converted / "manifest.json").read_text())
    for key in ("schema", "strategy", "base_model", "steps", "bypass_distance", "devices",
                "placement", "predicted", "quality", "files"):
        assert key in raw
    manifest = read_manifest(converted)
    assert manifest.steps == [[0], [1, 2], [3], [4]]
    assert manifest.predicted["latency_ratio"] > 0
    assert {"ppl_original", "ppl_untuned", "ppl_tuned", "ood"} <= set(manifest.quality)
    assert manifest.quality["ppl_tuned"] <= manifest.quality["ppl_untuned"]
    assert set(manifest.files) == {n for n in names if n != "manifest.json"}
    # every layer is placed (a single layer is split over every rank, a group member on its lane)
    held = {layer for rank in manifest.placement["ranks"] for layer in rank["layers"]}
    assert held == set(range(5))
    assert not any(p.name.startswith(".") for p in converted.parent.iterdir())


def test_loads_through_cqil_and_refuses_a_tampered_file(converted, tmp_path, cqil):
    import shutil

    from cqil_cli.inputs.models import load_model

    loaded = load_model(str(converted))
    assert loaded.model_type == "cqil" and loaded.model.config.groups[1] == [1, 2]
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\0" * 8)
    with pytest.raises(CqilError, match="changed or truncated"):
        load_model(str(copy))
    (copy / "model.safetensors").write_bytes(b"")  # found before any weights are read
    assert_clean_error(cqil("analyze", copy), "model.safetensors", "truncated")


def test_non_empty_target_without_force_is_left_alone(llama_folder, tmp_path, cqil):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(cqil("convert", llama_folder, "--out", out, "--groups", "1-2"), "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_interrupted_conversion_leaves_nothing(llama_folder, long_text, tmp_path, monkeypatch):
    from cqil_cli.convert import export as export_module
    from cqil_cli.convert import pipeline as conv

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "write_manifest", boom)
    out = tmp_path / "never"
    opts = conv.ConvertOptions(out=out, groups="1-2", tune_steps=0, tune_minutes=None,
                               calib=str(long_text), eval=str(long_text))
    with pytest.raises(KeyboardInterrupt):
        conv.run_convert(str(llama_folder), opts, {"device": "cpu"}, conv.Callbacks())
    assert list(tmp_path.iterdir()) == []


def test_search_under_a_budget_and_impossible_budget(llama_folder, long_text, tmp_path):
    from cqil_cli.convert import pipeline as conv

    opts = conv.ConvertOptions(out=tmp_path / "s", steps=4, group_size=2, tune_steps=0,
                               tune_minutes=None, calib=str(long_text), eval=str(long_text))
    manifest = conv.run_convert(str(llama_folder), opts, {"device": "cpu"}, conv.Callbacks())
    assert len(manifest.steps) <= 4 and manifest.grouping["source"] == "search"
    assert manifest.grouping["measured_kl"] >= 0
    opts = conv.ConvertOptions(out=tmp_path / "t", steps=2, group_size=2, tune_steps=0,
                               tune_minutes=None, calib=str(long_text), eval=str(long_text))
    with pytest.raises(CqilError, match="cannot be met.*fewest is 3"):
        conv.run_convert(str(llama_folder), opts, {"device": "cpu"}, conv.Callbacks())
    assert not (tmp_path / "t").exists()


def test_prune_writes_a_plain_model_any_tool_loads(llama_folder, long_text, tmp_path):
    from transformers import AutoModelForCausalLM

    from cqil_cli.convert import pipeline as conv
    from cqil_cli.convert.strategies import prune_kept_layers, skip_kept_layers

    opts = conv.ConvertOptions(out=tmp_path / "p", strategy="prune", steps=3, tune_steps=2,
                               tune_minutes=None, lora_rank=2, calib=str(long_text),
                               eval=str(long_text))
    manifest = conv.run_convert(str(llama_folder), opts, {"device": "cpu"}, conv.Callbacks())
    assert len(manifest.removed_layers) == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 3
    assert model(input_ids=__import__("torch").tensor([[1, 2, 3]])).logits.shape[-1] > 0
    assert prune_kept_layers([0.5, 0.1, 0.3, 0.05, 0.9], 3) == [0, 2, 4]
    assert skip_kept_layers(30, 2) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 29]
    assert len(skip_kept_layers(30, 1.25)) == 24


def test_output_has_ordinary_permissions(converted):
    umask = os.umask(0)
    os.umask(umask)
    assert (converted.stat().st_mode & 0o777) == 0o777 & ~umask
    assert ((converted / "model.safetensors").stat().st_mode & 0o777) == 0o666 & ~umask


def test_manifest_records_the_steps_taken(converted):
    tuning = json.loads((converted / "manifest.json").read_text())["tuning"]
    assert tuning["lora_rank"] == 2
    stages = {stage["name"]: stage for stage in tuning["stages"]}
    assert list(stages) == ["local", "e2e"]  # the default stages, in order
    # --tune-steps 2: two steps for the one block of the local stage, two end to end
    assert stages["local"]["steps"] == 2 and stages["e2e"]["steps"] == 2
    assert tuning["steps"] == 4
    for stage in stages.values():
        assert {"seconds", "loss_start", "loss_end", "ppl", "ppl_ood", "kept"} <= set(stage)
    assert [block["name"] for block in stages["local"]["blocks"]] == ["layers 1-2"]
    assert tuning["local"]["params"] == "full"


def test_skip_writes_a_cqil_folder_that_prompts_through_every_layer(llama_folder, long_text, tmp_path):
    import torch

    from cqil_cli.calibrate.evaluate import perplexity
    from cqil_cli.convert import pipeline as conv
    from cqil_cli.convert.strategies import skip_kept_layers_for_count
    from cqil_cli.inputs.models import load_model

    result = convert_in_process(llama_folder, "--out", tmp_path / "k", "--strategy", "skip",
                                "--steps", 3, "--tune-steps", 2, "--lora-rank", 2, "--calib",
                                long_text, "--eval", long_text, "--eval-ood", "none",
                                "--device", "cpu")
    assert "skipped when decoding: 1,3" in result.stdout
    manifest = read_manifest(tmp_path / "k")
    assert manifest.strategy == "skip" and manifest.skipped_layers == [1, 3]
    assert manifest.steps == [[0], [2], [4]]
    assert [s["steps"] for s in manifest.tuning["stages"]] == [4, 2]  # 2 blocks × 2, then 2
    assert manifest.quality["prompt_tokens"] == 128
    loaded = load_model(str(tmp_path / "k"))
    model = loaded.model
    assert model.config.skip_layers == [1, 3]
    ids = torch.randint(5, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        # perplexity after a prompt = the NLL of one prompt_length pass on the scored tokens
        logits = model(ids, prompt_length=12).logits[:, 11:-1].double()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 12:].flatten())
    assert perplexity(model, ids, prompt_tokens=12) == pytest.approx(float(nll.exp()), rel=1e-5)
    assert out.shape == (2, 24)
    assert "Unified Layer Skipping" in (tmp_path / "k" / "README.md").read_text()
    assert skip_kept_layers_for_count(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 29]
    assert skip_kept_layers_for_count(30, 24) == skip_kept_layers(30, 1.25) and len(skip_kept_layers(30, 1.25)) == 24
    with pytest.raises(CqilError, match="--eval-prompt"):
        conv.run_convert(str(llama_folder), conv.ConvertOptions(out=tmp_path / "x", strategy="skip", steps=3,
                                                                eval_prompt=255), {}, conv.Callbacks())


def skip_kept_layers(n, r):
    from cqil_cli.convert.strategies import skip_kept_layers as rule

    return rule(n, r)


def test_skip_option_errors_come_before_any_work(tmp_path):
    from cqil_cli.convert import pipeline as conv

    for opts, message in [
        (conv.ConvertOptions(out=tmp_path / "a", strategy="skip", steps=1), "keeps at least 2"),
        (conv.ConvertOptions(out=tmp_path / "b", strategy="skip", analysis=tmp_path / "r.json"), "--analysis"),
        (conv.ConvertOptions(out=tmp_path / "c", strategy="skip", groups="1-2"), "--groups"),
        (conv.ConvertOptions(out=tmp_path / "d", window_len=2), "--window-len"),
        (conv.ConvertOptions(out=tmp_path / "e", eval_windows=0), "--eval-windows"),
        (conv.ConvertOptions(out=tmp_path / "f", tune_windows=0), "--tune-windows"),
    ]:
        with pytest.raises(CqilError, match=message):
            conv.run_convert("no-such-model-is-loaded", opts, {}, conv.Callbacks())
    assert list(tmp_path.iterdir()) == []


def test_window_options_set_what_is_scored_and_tuned(llama_folder, long_text, tmp_path):
    from cqil_cli.runtime.manifest import read_manifest

    out = tmp_path / "out"
    convert_in_process(llama_folder, "--out", out, "--groups", "1-2", "--tune-steps", "1",
                       "--tune-stages", "e2e", "--lora-rank", "0", "--window-len", "32",
                       "--eval-windows", "3", "--tune-windows", "5", "--eval-ood", "none",
                       "--calib", long_text, "--eval", long_text, "--device", "cpu")
    manifest = read_manifest(out)
    assert manifest.calibration["seq_len"] == 32 and manifest.calibration["samples"] == 5
    assert manifest.quality["eval_tokens"] == 3 * 32 and manifest.quality["prompt_tokens"] == 16


def test_engine_distributed_budgets_against_tensor_parallelism(llama_folder, long_text,
                                                               tmp_path, monkeypatch):
    """--engine distributed: the search reads the alpha-beta model measured on --group-size local
    ranks, and the manifest records it with its prediction for the chosen steps."""
    from cqil_cli.search import parallel_probe

    measure = parallel_probe.measure_parallel_model
    monkeypatch.setattr(parallel_probe, "measure_parallel_model",
                        lambda config, w, **kw: measure(config, w, context_tokens=16, repeats=6,
                                                        **{k: v for k, v in kw.items()
                                                           if k == "dtype"}))
    out = tmp_path / "out"
    convert_in_process(llama_folder, "--out", out, "--engine", "distributed", "--group-size", "2",
                       "--steps", "3", "--tune-steps", "0", "--calib", long_text, "--eval",
                       long_text, "--device", "cpu")
    predicted = read_manifest(out).predicted
    assert predicted["engine"].startswith("cqil distributed (2 ranks")
    by_w = predicted["distributed"]["by_world_size"]["2"]
    assert by_w["decode_ms_per_token"] > 0 and by_w["tensor_parallel_ms_per_token"] > 0
    assert "running engine" in predicted["distributed"]["model"]["source"]
    assert predicted["latency_ratio"] == pytest.approx(by_w["ratio"], rel=1e-6)


def test_calib_with_self_samples_tunes_on_the_models_own_text(llama_folder, long_text, tmp_path):
    """--calib TEXT+self=SHARE: tuning windows partly sampled by the model; the measurements
    read TEXT alone; the manifest records the spec."""
    out = tmp_path / "out"
    convert_in_process(llama_folder, "--out", out, "--groups", "1-2", "--tune-steps", "1",
                       "--calib", f"{long_text}+self=0.5", "--eval", long_text, "--device", "cpu")
    manifest = read_manifest(out)
    assert manifest.calibration["spec"].endswith("+self=0.5")
    assert manifest.tuning["stages"]


def test_weights_int4_gptq_and_a_converted_folder_quantized_as_it_is(llama_folder, converted,
                                                                     long_text, tmp_path):
    """convert --weights int4 (GPTQ on the calibration windows) writes a quantized folder that
    loads and generates; a converted folder as MODEL keeps its steps and gets int8 weights; a
    quantized folder as MODEL is refused in one line."""
    import torch

    from cqil_cli.convert import pipeline as conv
    from cqil_cli.inputs.models import load_model
    from cqil_cli.runtime.quant_cqil import QuantLinear

    opts = conv.ConvertOptions(out=tmp_path / "q4", groups="1-2", bypass=1, tune_steps=0,
                               tune_minutes=None, calib=str(long_text), eval=str(long_text),
                               weights="int4", weight_group_size=32, weight_windows=4,
                               weight_method="gptq")
    manifest = conv.run_convert(str(llama_folder), opts, {"device": "cpu"}, conv.Callbacks())
    w = manifest.weights
    assert (w["format"], w["group_size"], w["method"], w["head"], w["windows"]) == ("int4", 32, "gptq", "int8", 4)
    assert w["linear_bytes_after"] < 0.3 * w["linear_bytes_before"]
    assert manifest.predicted["latency_model"]["weights"] == "int4"  # budgets in the format
    assert manifest.quality["ppl_tuned"] < 2 * manifest.quality["ppl_untuned"]
    loaded = load_model(str(tmp_path / "q4"))
    assert loaded.model.config.weights["format"] == "int4"
    assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 5 * 7 + 1
    with torch.no_grad():
        assert loaded.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)

    opts = conv.ConvertOptions(out=tmp_path / "c8", weights="int8", weight_method="local",
                               weight_minutes=0.05, weight_windows=4, calib=str(long_text),
                               eval=str(long_text))
    again = conv.run_convert(str(converted), opts, {"device": "cpu"}, conv.Callbacks())
    assert again.steps == read_manifest(converted).steps and again.weights["format"] == "int8"
    assert again.weights["method"] == "local" and again.weights["local"]["windows"] <= 4
    opts = conv.ConvertOptions(out=tmp_path / "twice", weights="int8", calib=str(long_text),
                               eval=str(long_text))
    with pytest.raises(CqilError, match="already quantized"):
        conv.run_convert(str(tmp_path / "q4"), opts, {"device": "cpu"}, conv.Callbacks())
    assert not (tmp_path / "twice").exists()
