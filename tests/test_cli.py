"""The command line as a user meets it: outputs, and one-line errors with a non-zero exit.

The commands run in this process through cqil_cli.cli.app.main (the `cqil` fixture of
tests/conftest.py); one test runs the installed console script itself."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_clean_error


def test_analyze_writes_report_and_heatmap(cqil, tiny_folder, text_file, tmp_path, umask_022):
    report_path, plot_path = tmp_path / "r.json", tmp_path / "h.png"
    result = cqil("analyze", tiny_folder, "--calib", text_file, "--samples", 3, "--seq-len", 16,
                  "--window", 2, "--repeats", 1, "--json", report_path, "--plot", plot_path)
    assert result.code == 0, result.err
    report = json.loads(report_path.read_text())
    n = report["num_layers"]
    for key in ("schema", "model", "num_layers", "similarity", "block_influence", "latency_ms",
                "groups"):
        assert key in report
    assert report["schema"] == "cqil.analyze/2" and report["sensitivity_measure"] == "local_error"
    assert len(report["similarity"]) == n and all(len(row) == n for row in report["similarity"])
    assert set(report["latency_ms"]) >= {"prefill", "decode"}
    assert all({"layers", "local_error", "cost", "kl", "delta_loss"} <= set(g)
               for g in report["groups"])
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Most promising" in result.out
    # outputs are ordinary files (not the private 0600 of their temporaries), nothing else left
    for path in (report_path, plot_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png", "r.json", "user.txt"]


@pytest.mark.parametrize("args,fragments", [
    (["analyze", "/no/such/model"], ["model not found"]),
    (["analyze", "{tiny}", "--window", "1"], ["bad --window"]),
    (["analyze", "{tiny}", "--window", "99", "--calib", "{text}"], ["bad --window", "between 2"]),
    (["analyze", "{tiny}", "--json", "/no/such/dir/r.json"], ["cannot write", "does not exist"]),
    (["analyze", "{tiny}", "--calib", "{short}"], ["too little text", "tokens"]),
    (["analyze", "{tiny}", "--calib", "/no/such/text.txt"], ["text not found"]),
    (["analyze", "{gguf}"], ["could not read GGUF"]),
    (["analyze", "{pickled}"], ["pickled weights"]),
    (["analyze", "{encdec}"], ["cannot load as a causal LM"]),
    (["analyze", "{tiny}", "--device", "cuda:7"], ["not available"]),
])
def test_bad_input_is_one_clear_line(cqil, args, fragments, llama_folder, text_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Far too short.")
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(64))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((llama_folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    encdec = tmp_path / "t5"
    encdec.mkdir()
    (encdec / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    (encdec / "model.safetensors").write_bytes(b"\x02" + bytes(7) + b"{}")  # empty, valid
    values = {"tiny": llama_folder, "text": text_file, "short": short, "gguf": gguf,
              "pickled": pickled, "encdec": encdec}
    assert_clean_error(cqil(*[a.format(**values) for a in args]), *fragments)


def test_help_explains_every_command(cqil):
    result = cqil("--help")
    assert result.code == 0 and "analyze" in result.out
    for command in ("convert", "bench", "assets"):
        assert command in result.out
    result = cqil("analyze", "--help")
    assert "--window" in result.out and "sensitivity" in result.out


def test_console_script_exits_2_with_one_line(tmp_path):
    """The installed `cqil` entry point itself (pyproject's [project.scripts])."""
    script = Path(sys.executable).with_name("cqil")
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable} (not installed with pip -e)")
    proc = subprocess.run([str(script), "analyze", str(tmp_path / "no-such-model")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cqil: error:")]
    assert len(lines) == 1 and "model not found" in lines[0], proc.stderr
    assert proc.stdout == ""
