"""The llama.cpp benchmark (cqil_cli/benchmarks/llamacpp.py) without llama.cpp, a build or the
network: its options, llama-bench's JSON, the format pairing, the arithmetic, the one-line
error when no build is found, and a whole run on fake binaries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cqil_cli.benchmarks import llamacpp
from cqil_cli.benchmarks.runtime import NEW_TOKENS, PROMPT_LEN
from cqil_cli.core.errors import CqilError

# What `llama-bench -m SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -p 0 -n 64 -d 128 -r 2 -o json`
# prints (llama.cpp 0c1e570, the one llama-cpp-python 0.3.36 vendors), its rates made round.
SAMPLE = """[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/cache/models/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "tensor_split": "0.00",
    "embeddings": false,
    "n_prompt": 0,
    "n_gen": 64,
    "n_depth": 128,
    "test_time": "2026-12-05T07:47:26Z",
    "avg_ns": 1600000000,
    "stddev_ns": 0,
    "avg_ts": 40.000000,
    "stddev_ts": 0.000000,
    "samples_ns": [ 1600000000, 1600000000 ],
    "samples_ts": [ 40, 40 ]
  }
]
"""


def sample(**changes) -> str:
    row = json.loads(SAMPLE)[0]
    row.update(changes)
    return json.dumps([row])


def test_options_and_defaults():
    args = llamacpp.parse_args([])
    assert args.formats == list(llamacpp.FORMATS) and args.repeats == 5
    assert args.llama_cpp is None and not args.build and args.with_cqil == [] and args.baseline is None
    assert not args.compile and llamacpp.parse_args(["--compile"]).compile
    args = llamacpp.parse_args(["-r", "3", "--formats", "F32,Q4_1", "--with-cqil", "a", "b",
                                "--baseline", "Q8_0", "--threads", "1", "--json", "out.json"])
    assert (args.repeats, args.formats, args.with_cqil, args.baseline, args.threads, args.json) == \
        (3, ["F32", "Q4_1"], ["a", "b"], "Q8_0", 1, "out.json")


@pytest.mark.parametrize("argv", [["--formats", "Q5_K"], ["--formats", ","], ["-r", "0"],
                                  ["--baseline", "Q2_K"], ["--build", "--llama-cpp", "x"],
                                  ["--threads", "0"]])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit) as exc:
        llamacpp.parse_args(argv)
    assert exc.value.code == 2


def test_bench_json_is_read_and_rates_become_ms_per_token():
    text = "load_backend: loaded CPU backend\n" + SAMPLE  # anything before the array is skipped
    (row,) = llamacpp.parse_bench_json(text)
    assert (row["n_gen"], row["n_depth"], row["build_commit"]) == (64, 128, "0c1e570")
    assert llamacpp.ms_per_token(row["avg_ts"]) == pytest.approx(25.0)
    # the mean rate and the mean time agree: 64 tokens in avg_ns
    assert llamacpp.ms_per_token(row["avg_ts"]) == pytest.approx(row["avg_ns"] / 1e6 / row["n_gen"])
    assert llamacpp.ms_per_token(1000.0) == pytest.approx(1.0)
    for bad in ("", "not json", "[]", '[{"n_gen": 64}]'):
        with pytest.raises(CqilError):
            llamacpp.parse_bench_json(bad)
    with pytest.raises(CqilError):
        llamacpp.ms_per_token(0.0)


def test_bench_arguments_time_new_tokens_after_the_prompt():
    args = llamacpp.bench_args(Path("m.gguf"), 2, 0, NEW_TOKENS, PROMPT_LEN, 1)
    assert args == ["-m", "m.gguf", "-t", "2", "-p", "0", "-n", str(NEW_TOKENS), "-d",
                    str(PROMPT_LEN), "-r", "1", "-o", "json"]


@pytest.mark.parametrize("config, weights, fmt", [
    ({"weights": {"format": "int4", "group_size": 32}, "dtype": "float32"}, "int4", "Q4_1"),
    ({"weights": {"format": "int8"}, "dtype": "bfloat16"}, "int8", "Q8_0"),
    ({"dtype": "bfloat16"}, "bfloat16", "F16"),
    ({"torch_dtype": "float16"}, "float16", "F16"),
    ({"dtype": "float32"}, "float32", "F32"),
    ({}, "float32", "F32"),
    (None, "float32", "F32"),
])
def test_folders_pair_with_the_format_of_their_weights(config, weights, fmt):
    assert llamacpp.folder_format(config) == weights
    assert llamacpp.paired_format(weights) == fmt
    assert llamacpp.paired_format(weights, "Q8_0") == "Q8_0"  # --baseline wins


def test_unknown_weights_need_a_baseline():
    with pytest.raises(CqilError, match="--baseline"):
        llamacpp.paired_format("int3")


def test_ratios_divide_by_the_paired_format():
    llama = {"Q4_1": llamacpp.summarize([20.0, 10.0, 30.0], [100.0]),
             "F32": llamacpp.summarize([40.0], [])}
    assert llama["Q4_1"]["decode_ms_per_token"] == 20.0 and llama["Q4_1"]["tokens_per_s"] == 50.0
    assert llama["F32"]["prefill_ms"] is None
    cqil = {"q": llamacpp.summarize([30.0], [250.0]), "d": llamacpp.summarize([20.0], [80.0])}
    llamacpp.add_ratios(cqil, {"q": "int4", "d": "float32"}, llama, None)
    assert (cqil["q"]["baseline"], cqil["q"]["decode_ratio"], cqil["q"]["prefill_ratio"]) == ("Q4_1", 1.5, 2.5)
    assert (cqil["d"]["baseline"], cqil["d"]["decode_ratio"]) == ("F32", 0.5)
    assert "prefill_ratio" not in cqil["d"]  # F32's prefill was not timed
    llamacpp.add_ratios(cqil, {"q": "int4", "d": "float32"}, llama, "Q4_1")
    assert cqil["d"]["baseline"] == "Q4_1" and cqil["d"]["decode_ratio"] == 1.0


def test_llama_bench_is_called_and_read(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, SAMPLE, "")

    monkeypatch.setattr(llamacpp.subprocess, "run", fake_run)
    row = llamacpp.llama_bench(tmp_path, tmp_path / "m.gguf", 2, 0, 64, 128)
    assert row["avg_ts"] == 40.0 and calls[0][0] == str(tmp_path / "llama-bench")
    with pytest.raises(CqilError, match="expected one result row"):  # not the test asked for
        llamacpp.llama_bench(tmp_path, tmp_path / "m.gguf", 2, 128, 0, 0)
    monkeypatch.setattr(llamacpp.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "main: error: failed to load model 'm.gguf'\n"))
    with pytest.raises(CqilError, match="failed to load model"):
        llamacpp.llama_bench(tmp_path, tmp_path / "m.gguf", 2, 0, 64, 128)


def test_a_bogus_build_folder_is_one_line(capsys, tmp_path):
    assert llamacpp.main(["--llama-cpp", str(tmp_path / "nowhere"), "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --llama-cpp ") and "Traceback" not in err
    assert "llama-bench" in err


def test_no_build_without_build_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-bench on PATH either
    assert llamacpp.main(["--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no llama.cpp build found" in err and "--build" in err


def test_a_missing_cmake_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(llamacpp, "find_tool", lambda name: None)  # nor one in the venv
    assert llamacpp.main(["--build", "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs cmake" in err


def test_the_build_shows_progress_and_names_its_log(capsys, tmp_path):
    log = tmp_path / "build.log"
    script = "print('[ 50%] Building a'); print('[100%] Linking b')"
    llamacpp.run_logged([sys.executable, "-c", script], log, "cmake build")
    err = capsys.readouterr().err
    assert "cmake build: [ 50%]" in err and "cmake build: [100%]" in err
    assert "Linking b" in log.read_text()
    with pytest.raises(CqilError, match="build.log"):
        llamacpp.run_logged([sys.executable, "-c", "raise SystemExit(3)"], log, "cmake build")


def fake_build(folder: Path) -> Path:
    """A bin folder whose llama-quantize copies its input and whose llama-bench is never run."""
    folder.mkdir(parents=True)
    (folder / "llama-quantize").write_text('#!/bin/sh\necho "quantizing $4"\ncp "$2" "$3"\n')
    (folder / "llama-bench").write_text("#!/bin/sh\nexit 1\n")
    for name in llamacpp.BINARIES:
        (folder / name).chmod(0o755)
    return folder


def test_a_whole_run_on_fake_binaries(monkeypatch, tmp_path, capsys):
    cache = tmp_path / "cache"
    bin_dir = fake_build(cache / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" / "bin")
    source = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    source.write_bytes(b"GGUF")
    monkeypatch.setattr(llamacpp, "source_gguf", lambda cache: source)
    rates = {"Q4_1": 50.0, "F32": 20.0}

    def fake_run(cmd, **kwargs):
        fmt = Path(cmd[cmd.index("-m") + 1]).name.split(".")[-2]
        n_prompt, n_gen = int(cmd[cmd.index("-p") + 1]), int(cmd[cmd.index("-n") + 1])
        rate = rates[fmt] * (10 if n_gen == 0 else 1)
        return subprocess.CompletedProcess(cmd, 0, sample(n_prompt=n_prompt, n_gen=n_gen, avg_ts=rate), "")

    monkeypatch.setattr(llamacpp.subprocess, "run", fake_run)
    out = tmp_path / "r.json"
    assert llamacpp.main(["--cache", str(cache), "--formats", "Q4_1,F32", "-r", "2",
                          "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["llama_cpp"]["bin"] == str(bin_dir) and report["llama_cpp"]["llama_cpp_python"] == "0.3.36"
    assert report["llama_cpp"]["build_commit"] == "0c1e570" and report["machine"]
    q4, f32 = report["llama_cpp_results"]["Q4_1"], report["llama_cpp_results"]["F32"]
    assert q4["decode_ms_per_token"] == pytest.approx(20.0) and len(q4["decode_ms_runs"]) == 2
    assert f32["decode_ms_per_token"] == pytest.approx(50.0)
    assert q4["prefill_ms"] == pytest.approx(PROMPT_LEN * 1000 / 500.0)
    assert (cache / "models" / "SmolLM2-135M-Instruct.F32.gguf").read_bytes() == b"GGUF"
    assert (report["prompt_tokens"], report["new_tokens"]) == (PROMPT_LEN, NEW_TOKENS)
    table = capsys.readouterr().out
    assert "llama.cpp Q4_1" in table and "20.00" in table and "50.00" in table


def test_the_pinned_build_in_the_cache_is_found_first(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert llamacpp.find_build(None, tmp_path) is None
    builds = tmp_path / "{}" / "vendor" / "llama.cpp" / "build" / "bin"
    other = fake_build(Path(str(builds).format("llama_cpp_python-0.3.9")))
    assert llamacpp.find_build(None, tmp_path, "0.3.36") == other
    pinned = fake_build(Path(str(builds).format("llama_cpp_python-0.3.36")))
    assert llamacpp.find_build(None, tmp_path, "0.3.36") == pinned
    assert llamacpp.find_build(str(other), tmp_path / "elsewhere") == other  # --llama-cpp wins
    assert llamacpp.source_version(pinned) == "0.3.36"


def test_a_folder_in_a_chosen_dtype(monkeypatch, tmp_path, capsys):
    """--with-cqil FOLDER@DTYPE loads that folder in that dtype (the same folder may come twice);
    an unknown dtype is one line."""
    bin_dir = fake_build(tmp_path / "bin")
    loads = []

    def fake_load(spec, dtype=None, compile=False):
        loads.append((spec, dtype))
        assert compile is False
        raise CqilError("stop here")

    monkeypatch.setattr(llamacpp, "load_cqil", fake_load)
    assert llamacpp.main(["--llama-cpp", str(bin_dir), "--with-cqil", "o4@bf16"]) == 2
    assert loads == [("o4", "bf16")]  # --compile is passed on (default False)
    assert llamacpp.main(["--llama-cpp", str(bin_dir), "--with-cqil", "o4@int3"]) == 2
    err = capsys.readouterr().err
    assert "unknown dtype 'int3'" in err and "Traceback" not in err
