"""cqil_cli/benchmarks/scale.py: `make` writes a loadable random model of a shape; `run` drives
analyze, convert and bench as subprocesses and reports wall time and peak RSS against bounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_offline_tokenizer

from cqil_cli.benchmarks import scale

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("scale")
    tokenizer = save_offline_tokenizer(base / "tokenizer")
    out = base / "model"
    scale.main(["make", "--shape", "tiny", "--out", str(out), "--tokenizer", str(tokenizer),
                "--shard-gb", "0.004"])  # ~6.6 MB of weights: two shards and an index
    return out


def test_make_writes_a_seeded_loadable_sharded_folder(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    index = json.loads((tiny_folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert index["metadata"]["total_size"] == scale.weight_bytes(tiny_folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.bfloat16)
    config = scale.SHAPES["tiny"]
    assert model.config.num_hidden_layers == config["num_hidden_layers"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    weight = model.model.layers[0].mlp.up_proj.weight.float()
    assert abs(weight.std().item() - 0.02) < 2e-3 and abs(weight.mean().item()) < 2e-3
    assert torch.equal(model.model.norm.weight.float(), torch.ones(config["hidden_size"]))
    source = json.loads((tiny_folder / scale.SOURCE_FILE).read_text())
    assert source["parameters"] == sum(p.numel() for p in model.parameters())
    # The same seed draws the same weights.
    again = tmp_path / "again"
    scale.main(["make", "--shape", "tiny", "--out", str(again), "--tokenizer",
                str(tiny_folder)])
    twin = AutoModelForCausalLM.from_pretrained(again, dtype=torch.bfloat16)
    assert torch.equal(twin.model.layers[0].mlp.up_proj.weight,
                       model.model.layers[0].mlp.up_proj.weight)


def test_published_shapes_have_their_parameter_counts():
    from transformers import LlamaConfig, LlamaForCausalLM

    expected = {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
                "llama-3.1-8b": 8_030_261_248}
    for shape, count in expected.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**scale.SHAPES[shape]))
        assert sum(p.numel() for p in model.parameters()) == count, shape


def test_run_reports_time_and_peak_memory_of_each_command(tiny_folder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    report_path = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cqil_cli.benchmarks.scale", "run", str(tiny_folder),
         "--device", "cpu", "--text", str(text), "--work", str(tmp_path / "work"),
         "--json", str(report_path), "--seq-len", "8", "--new-tokens", "2",
         "--eval-tokens", "16", "--local-windows", "1",
         "--convert-set", "window_len=16,eval_windows=2,tune_windows=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["schema"] == "cqil.scale/1" and report["layers"] == 4
    assert report["weight_bytes"] == scale.weight_bytes(tiny_folder)
    rows = {row["command"]: row for row in report["commands"]}
    assert list(rows) == ["analyze", "convert", "bench"]
    for name, row in rows.items():
        assert row["exit_code"] == 0, Path(row["log"]).read_text()[-2000:]
        assert row["wall_seconds"] > 0 and row["peak_rss_bytes"] > 0
        assert row["bound_bytes"] > scale.RESERVE_BYTES and row["within_bound"] is not None
        assert row["datasets_imported"] is False
        assert row["argv"][:2] == ["cqil", name]
    assert rows["convert"]["convert_overrides"] == {"window_len": 16, "eval_windows": 2,
                                                    "tune_windows": 4}
    assert (tmp_path / "work" / "converted" / "manifest.json").exists()
    assert json.loads((tmp_path / "work" / "bench.json").read_text())
    assert "| analyze |" in proc.stdout and "| bench |" in proc.stdout
