"""The command line as a user meets it: outputs, and one-line errors with a non-zero exit."""

import json
import os
import subprocess
import sys

import pytest

CQIL = [sys.executable, "-m", "cqil_cli"]


def run(*args, env=None):
    return subprocess.run([*CQIL, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cqil: error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_analyze_writes_report_and_heatmap(tiny_folder, text_file, tmp_path):
    report_path, plot_path = tmp_path / "r.json", tmp_path / "h.png"
    proc = run("analyze", tiny_folder, "--calib", text_file, "--samples", 3, "--seq-len", 16,
               "--window", 2, "--repeats", 1, "--json", report_path, "--plot", plot_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    n = report["num_layers"]
    for key in ("schema", "model", "num_layers", "similarity", "block_influence", "latency_ms",
                "groups"):
        assert key in report
    assert report["schema"] == "cqil.analyze/1"
    assert len(report["similarity"]) == n and all(len(row) == n for row in report["similarity"])
    assert set(report["latency_ms"]) >= {"prefill", "decode"}
    assert all({"layers", "kl", "delta_loss"} <= set(g) for g in report["groups"])
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Most promising" in proc.stdout


@pytest.mark.parametrize("args,fragments", [
    (["analyze", "/no/such/model"], ["model not found"]),
    (["analyze", "{tiny}", "--window", "1"], ["bad window"]),
    (["analyze", "{tiny}", "--window", "99", "--calib", "{text}"], ["bad window", "between 2"]),
    (["analyze", "{tiny}", "--json", "/no/such/dir/r.json"], ["cannot write", "does not exist"]),
    (["analyze", "{tiny}", "--calib", "{short}"], ["too little text", "tokens"]),
    (["analyze", "{tiny}", "--calib", "/no/such/text.txt"], ["text not found"]),
    (["analyze", "{gguf}"], ["could not read GGUF"]),
    (["analyze", "{pickled}"], ["pickled weights"]),
    (["analyze", "{encdec}"], ["cannot load as a causal LM"]),
    (["analyze", "{tiny}", "--device", "cuda:7"], ["not available"]),
])
def test_bad_input_is_one_clear_line(args, fragments, llama_folder, text_file, tmp_path):
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
    (encdec / "model.safetensors").write_bytes(b"")
    values = {"tiny": llama_folder, "text": text_file, "short": short, "gguf": gguf,
              "pickled": pickled, "encdec": encdec}
    proc = run(*[a.format(**values) for a in args])
    assert_clean_error(proc, *fragments)


def test_help_explains_every_command():
    proc = run("--help")
    assert proc.returncode == 0 and "analyze" in proc.stdout
    proc = run("analyze", "--help")
    assert "--window" in proc.stdout and "sensitivity" in proc.stdout
