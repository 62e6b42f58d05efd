"""The scripts prepared for a GPU machine, run here on the CPU: benchmarks/layer_compute.py
(per-layer compute of one rank's slice), benchmarks/predict_parallel.py --compute-json (rows
from those measurements), benchmarks/gpu_checks.py (engine correctness on a device).

Each runs in this process through its main(argv), with one torch thread (tiny tensors: more
threads only contend for the cores)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from cqil_cli.benchmarks import gpu_checks, layer_compute, predict_parallel

MEASURED = "H200 SXM, NVSwitch (layer compute measured)"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_document(tmp_path_factory):
    path = tmp_path_factory.mktemp("layer_compute") / "tiny.json"
    torch.set_num_threads(1)
    rc = layer_compute.main(["--shapes", "tiny", "--device", "cpu", "--dtype", "float32",
                             "--context", "16", "--repeats", "3", "--json", str(path)])
    assert rc == 0
    return json.loads(path.read_text())


def test_layer_compute_document(tiny_document):
    doc = tiny_document
    assert doc["schema"] == "cqil.layer_compute/1"
    assert (doc["device"], doc["dtype"], doc["context"], doc["batch"]) == (
        "cpu", "float32", 16, 1)
    assert doc["torch"] == torch.__version__
    shape = doc["shapes"]["tiny"]
    tiny = layer_compute.TINY
    assert set(shape["layer"]) == {"1", "2"}  # 2 kv heads: lanes of at most 2 ranks
    assert set(shape["head"]) == set(shape["embed"]) == {"1", "2", "4", "8"}
    for t, e in shape["layer"].items():
        # the slice the engine runs has exactly the bytes the alpha-beta model counts
        assert e["weight_bytes"] == 4 * tiny.layer_elements(int(t))
        assert e["weight_bytes"] + e["cache_bytes"] == e["bytes"] == \
            4 * tiny.layer_elements(int(t), 1, 16 + 1)  # the cache read: 16 + the new token
    for w, e in shape["head"].items():
        assert e["weight_bytes"] == 4 * tiny.head_elements(int(w))
    for part in ("layer", "head", "embed"):
        for e in shape[part].values():
            assert e["eager_s"] > 0 and e["graph_s"] is None  # no CUDA graph on the CPU
            assert e["eager_bytes_per_s"] == pytest.approx(e["bytes"] / e["eager_s"])
            assert 1 <= e["copies"] <= 16


def _as_published(doc: dict) -> dict:
    """The tiny measurement under every published shape's name and lane size (predict_parallel
    reads shapes by name), graph times set for lanes of 4 and 8 (they win over eager)."""
    out = copy.deepcopy(doc)
    tiny = doc["shapes"]["tiny"]
    entry = {**tiny, "layer": {str(t): dict(tiny["layer"]["1"]) for t in (1, 2, 4, 8)}}
    for t in ("4", "8"):
        entry["layer"][t]["graph_s"] = entry["layer"][t]["eager_s"] / 2
    out["shapes"] = {s.name: entry for s in layer_compute.SHAPES["big"]}
    return out


def test_predict_parallel_adds_measured_rows(tiny_document, tmp_path, capsys):
    compute = tmp_path / "compute.json"
    compute.write_text(json.dumps(_as_published(tiny_document)))
    assert predict_parallel.main(["--json", str(tmp_path / "plain.json")]) == 0
    plain_out = capsys.readouterr().out
    assert predict_parallel.main(["--compute-json", str(compute),
                                  "--json", str(tmp_path / "measured.json")]) == 0
    out = capsys.readouterr().out
    assert MEASURED not in plain_out and out.count(f"| {MEASURED} |") == len(
        predict_parallel.CASES)
    assert "H200 datasheet" in out and "H200" not in plain_out
    plain = json.loads((tmp_path / "plain.json").read_text())
    measured = json.loads((tmp_path / "measured.json").read_text())
    # the published-figure rows are unchanged; each measured row sits after its case's H100 row
    assert [r for r in measured["rows"] if r["platform"] != MEASURED] == plain["rows"]
    rows = [r for r in measured["rows"] if r["platform"] == MEASURED]
    assert {(r["model"], r["world_size"]) for r in rows} == {
        (s.name, w) for s, w, *_ in predict_parallel.CASES}
    # compute from the document: per-layer seconds (graph where there is one) x layers
    doc = _as_published(tiny_document)
    for r in rows:
        w, shape = r["world_size"], doc["shapes"][r["model"]]
        layer = shape["layer"][str(w)]
        per_layer_s = layer["graph_s"] or layer["eager_s"]
        assert r["tp_ms"] > r["layers"] * per_layer_s * 1e3
    assert "settings" in measured and "compute_json" not in plain["settings"]


def test_predict_parallel_refuses_another_document(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "cqil.bench/1"}))
    assert predict_parallel.main(["--compute-json", str(bad)]) == 2
    assert "not a layer compute document" in capsys.readouterr().err


def test_gpu_checks_pass_on_the_cpu(tmp_path, capsys):
    path = tmp_path / "checks.json"
    rc = gpu_checks.main(["--device", "cpu", "--families", "llama,gemma3_text",
                          "--json", str(path)])
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert rc == 0, out
    names = [c["name"] for c in result["checks"]]
    assert gpu_checks.examples(["llama", "gemma3_text"]) == ["llama-gqa", "llama-bias",
                                                              "gemma3-local"]
    for kind in ("llama-gqa", "llama-bias", "gemma3-local"):  # every tiny example of both
        for check in (f"fused=reference {kind} fp32", f"cached=uncached {kind} fp32",
                      f"fastgen (eager)=reference {kind} fp32",
                      f"fused=reference {kind} bf16"):
            assert check in names and check in out
        assert f"distributed W=1 (gloo)=fused {kind} fp32 tokens" in names
    assert result["failed"] == [] and all(c["passed"] for c in result["checks"])


def test_gpu_checks_fail_loudly(monkeypatch, capsys):
    """A check over its limit, or a family that raises, fails the run (exit 1) and the other
    checks still run and print."""
    monkeypatch.setattr(gpu_checks, "distributed_checks", lambda device, notes, families=None: [])
    monkeypatch.setitem(gpu_checks.LIMITS, torch.float32, 0.0)  # fp32 engines never agree to 0
    real = gpu_checks.family_checks

    def family_checks(kind, device):
        if kind == "mistral-one-kv":
            raise RuntimeError("boom")
        return real(kind, device)

    monkeypatch.setattr(gpu_checks, "family_checks", family_checks)
    assert gpu_checks.main(["--device", "cpu", "--families", "mistral,qwen2"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  mistral-one-kv: RuntimeError: boom" in out
    assert "FAIL  fused=reference qwen2-bias fp32" in out
    assert "pass  cached=uncached qwen2-bias fp32" in out
    assert gpu_checks.main(["--families", "nope"]) == 2


def test_gpu_scripts_import_without_datasets():
    """The GPU machine has no `datasets`: the scripts' imports must not reach it."""
    import subprocess

    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'datasets':\n"
            "            raise ImportError('datasets is blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import cqil_cli.benchmarks.layer_compute, cqil_cli.benchmarks.gpu_checks\n"
            "import cqil_cli.benchmarks.predict_parallel\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
