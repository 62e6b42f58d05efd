"""Bad inputs, as a new user meets them: every one fails fast (under 10 s of wall time), before
any model weights are read where the input does not need them, with exactly one line on stderr
(`cqil: error: …`, naming the thing and the fix), exit code 2, and no file left behind.

The table is command → the fragment its one line must hold. Commands run in this process
through cqil_cli.cli.app.main (conftest's run_cqil); a subprocess only for what needs one
(torch not imported by --help, SIGTERM during a native call).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import run_cqil

from cqil_cli.core.errors import CqilError

REPO = Path(__file__).resolve().parents[1]
WALL_S = 10.0

# {model}: a tiny 5-layer Llama (256 positions); {text}: good text; {binary}, {latin1}:
# calibration "text" that is random bytes / Latin-1; {truncated}, {garbage}: model folders
# whose model.safetensors is cut short / random bytes; {report}: an analyze report of 5 layers
# with window 2.
CONVERT = ["convert", "{model}", "--out", "out", "--calib", "{text}", "--eval", "{text}",
           "--eval-ood", "none", "--device", "cpu"]
ANALYZE = ["analyze", "{model}", "--calib", "{text}", "--device", "cpu"]
BENCH = ["bench", "{model}", "--baseline", "{model}", "--eval", "{text}", "--device", "cpu"]
GENERATE = ["generate", "{model}", "--prompt", "hi", "--device", "cpu"]

CASES = [
    # convert: the grouping, against config.json's 5 layers, before anything loads
    (CONVERT + ["--groups", "a-b"], "bad --groups: bad group 'a-b'"),
    (CONVERT + ["--groups", "1-2,2-3"], "overlap at layer 2"),
    (CONVERT + ["--groups", "3-4,4-5"], "out of range"),
    (CONVERT + ["--groups", "0-2"], "pass --group-size 3"),
    (CONVERT + ["--steps", "100"], "bad --steps 100: between 1 and 5"),
    (CONVERT + ["--steps", "2"], "the fewest is 3"),
    (CONVERT + ["--group-size", "9"], "bad --group-size 9: at most 5"),
    (CONVERT + ["--start", "1", "--end", "4"], "not a multiple of --group-size 2"),
    (CONVERT + ["--start", "1"], "--start and --end go together"),
    (CONVERT + ["--budget", "0.5", "--steps", "3"], "give one of --budget"),
    (CONVERT + ["--analysis", "missing.json"], "--analysis missing.json: file not found"),
    (CONVERT + ["--analysis", "{report}", "--group-size", "3"], "cqil analyze --window 3"),
    (CONVERT + ["--strategy", "skip", "--analysis", "{report}"], "--analysis applies to"),
    (CONVERT + ["--out", "/proc/x"], "cannot write --out /proc/x"),
    (CONVERT + ["--out", "{text}"], "is a file; give a folder"),
    (CONVERT + ["--groups", "1-2", "--tune-steps", "-1"], "bad --tune-steps -1: at least 0"),
    (CONVERT + ["--window-len", "100000"], "bad --window-len 100000: at most 256"),
    (CONVERT + ["--window-len", "3"], "bad --window-len 3: at least 4"),
    (CONVERT + ["--eval-windows", "0"], "bad --eval-windows 0: at least 1"),
    (CONVERT + ["--eval-prompt", "-1"], "bad --eval-prompt -1: at least 0"),
    (CONVERT + ["--eval-prompt", "255"], "bad --eval-prompt 255: between 0 and 254"),
    (CONVERT + ["--budget", "0"], "bad --budget 0.0: in (0, 1]"),
    (CONVERT + ["--budget", "1.5"], "bad --budget 1.5: in (0, 1]"),
    (CONVERT + ["--speedup", "0.5"], "bad --speedup 0.5: at least 1"),
    (CONVERT + ["--steps", "0"], "bad --steps 0: at least 1"),
    (CONVERT + ["--start", "-1", "--end", "2"], "bad --start -1: at least 0"),
    (CONVERT + ["--start", "0", "--end", "0"], "bad --end 0: at least 1"),
    (CONVERT + ["--group-size", "0"], "bad --group-size 0: at least 1"),
    (CONVERT + ["--bypass", "-1"], "bad --bypass -1: at least 0"),
    (CONVERT + ["--tune-minutes", "-1"], "bad --tune-minutes -1.0: at least 0"),
    (CONVERT + ["--tune-windows", "0"], "bad --tune-windows 0: at least 1"),
    (CONVERT + ["--tune-stages", "e2e,local"], "bad --tune-stages 'e2e,local'"),
    (CONVERT + ["--lora-rank", "-1"], "bad --lora-rank -1: at least 0"),
    (CONVERT + ["--local-share", "1"], "bad --local-share 1.0: in (0, 1)"),
    (CONVERT + ["--local-steps", "-1"], "bad --local-steps -1: at least 0"),
    (CONVERT + ["--local-windows", "0"], "bad --local-windows 0: at least 1"),
    (CONVERT + ["--strategy", "merge"], "Invalid value for '--strategy'"),
    (CONVERT + ["--engine", "tpu"], "Invalid value for '--engine'"),
    (CONVERT + ["--calib", "{binary}"], "is not text: binary data"),
    (CONVERT + ["--eval", "{latin1}"], "is not valid utf-8 text at byte 3 (0xe9)"),
    (CONVERT + ["--calib", "{text}", "--encoding", "klingon"], "bad --encoding 'klingon'"),
    (CONVERT + ["--calib", "nothing-here.txt"], "text not found"),
    (CONVERT + ["--json", "manifest.txt"], "ending in .json"),
    (CONVERT + ["--dtype", "int3"], "unknown dtype 'int3'"),
    (CONVERT + ["--device", "cuda:7"], "not available"),
    (["convert", "{truncated}", "--out", "out"], "truncated safetensors file"),
    (["convert", "{garbage}", "--out", "out"], "corrupt safetensors file"),
    (["convert", "mymodels/llama", "--out", "out"], "model not found: no folder mymodels/llama"),
    (["convert", "--out", "out"], "Missing argument 'MODEL'"),
    (["convert", "{model}"], "Missing option '--out'"),
    # analyze
    (ANALYZE + ["--samples", "0"], "bad --samples 0: at least 1"),
    (ANALYZE + ["--seq-len", "1"], "bad --seq-len 1: at least 2"),
    (ANALYZE + ["--seq-len", "100000"], "bad --seq-len 100000: at most 256 tokens"),
    (ANALYZE + ["--window", "1"], "bad --window 1: at least 2"),
    (ANALYZE + ["--window", "9"], "bad --window 9: between 2 and the number of layers (5)"),
    (ANALYZE + ["--batch-size", "0"], "bad --batch-size 0: at least 1"),
    (ANALYZE + ["--repeats", "0"], "bad --repeats 0: at least 1"),
    (ANALYZE + ["--samples", "many"], "'many' is not a valid integer"),
    (ANALYZE + ["--plot", "heat.txt"], "ending in .png"),
    (ANALYZE + ["--json", "/no/such/dir/r.json"], "does not exist"),
    (ANALYZE + ["--calib", "{binary}"], "is not text: binary data"),
    (ANALYZE + ["--calib", "{latin1}"], "pass --encoding"),
    (ANALYZE + ["--nope"], "No such option '--nope'"),
    (["analyze", "{truncated}"], "model.safetensors: truncated"),
    (["analyze", "./no/such/model"], "model not found"),
    # bench
    (BENCH + ["--prompt-len", "0"], "bad --prompt-len 0: at least 1"),
    (BENCH + ["--new-tokens", "-5"], "bad --new-tokens -5: at least 2"),
    (BENCH + ["--batch", "0"], "bad batch list"),
    (BENCH + ["--repeats", "0"], "bad --repeats 0: at least 1"),
    (BENCH + ["--warmup", "-1"], "bad --warmup -1: at least 0"),
    (BENCH + ["--eval-tokens", "1"], "bad --eval-tokens 1: at least 2"),
    (BENCH + ["--eval-window", "1"], "bad --eval-window 1: at least 2"),
    (BENCH + ["--eval-window", "4096", "--eval-tokens", "8192"],
     "bad --eval-window 4096: at most 256 tokens"),
    (BENCH + ["--eval-prompt", "-1"], "bad --eval-prompt -1: at least 0"),
    (BENCH + ["--greedy-prompts", "0"], "bad --greedy-prompts 0: at least 1"),
    (BENCH + ["--greedy-tokens", "0"], "bad --greedy-tokens 0: at least 1"),
    (BENCH + ["--ranks", "0"], "bad --ranks 0: at least 1"),
    (BENCH + ["--prompt-len", "100000"], "at most 256 tokens"),
    (BENCH + ["--plot", "chart.svg"], "ending in .png"),
    (BENCH + ["--eval", "{binary}"], "is not text"),
    (BENCH + ["--no-latency", "--no-quality"], "nothing to measure"),
    # generate
    (GENERATE + ["--new-tokens", "-5"], "bad --new-tokens -5: at least 1"),
    (GENERATE + ["--ranks", "0"], "bad --ranks 0: at least 1"),
    (GENERATE + ["--new-tokens", "100000"], "at most 256 tokens"),
    (GENERATE + ["--do-sample", "--temperature", "0"], "bad --temperature 0.0: more than 0"),
    (GENERATE + ["--do-sample", "--top-k", "0"], "bad --top-k 0: at least 1"),
    (GENERATE + ["--do-sample", "--top-p", "0"], "bad --top-p 0.0: in (0, 1]"),
    (GENERATE + ["--do-sample", "--top-p", "1.5"], "bad --top-p 1.5: in (0, 1]"),
    (GENERATE + ["--top-k", "5"], "need --do-sample"),
    (GENERATE + ["--json", "out.txt"], "ending in .json"),
    (["generate", "{garbage}", "--prompt", "hi"], "corrupt safetensors file"),
    (["generate", "{model}"], "Missing option '--prompt'"),
    # the command itself
    (["fly"], "No such command 'fly'"),
    (["assets", "fetch", "--json", "/no/such/dir/a.json"], "does not exist"),
    # global flags after the command's name
    (CONVERT + ["--steps", "100", "-q"], "bad --steps 100"),
    (ANALYZE + ["--quiet", "--samples", "0"], "bad --samples 0"),
]


@pytest.fixture(scope="module")
def inputs(llama_folder, tmp_path_factory) -> dict:
    """The files the table names, made once."""
    root = tmp_path_factory.mktemp("inputs")
    text = root / "good.txt"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box".split()
    text.write_text(" ".join(words[i % len(words)] for i in range(3000)))
    binary = root / "random.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    latin1 = root / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait, na\u00efve".encode("latin-1"))
    truncated = shutil.copytree(llama_folder, root / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage = shutil.copytree(llama_folder, root / "garbage")
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    report = root / "report.json"
    report.write_text('{"schema": "cqil.analyze/2", "num_layers": 5, "window": 2, '
                      '"groups": [{"layers": [0, 1], "size": 2}]}')
    return {"model": llama_folder, "text": text, "binary": binary, "latin1": latin1,
            "truncated": truncated, "garbage": garbage, "report": report}


@pytest.fixture()
def no_weights_read(monkeypatch):
    """Any attempt to load a model's weights fails the test."""
    from cqil_cli.inputs import models

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were read")

    for name in ("_load_folder", "_load_gguf", "_load_hub"):
        monkeypatch.setattr(models, name, refuse)


def run_in(folder: Path, args: list[str], values: dict):
    """run_cqil with cwd `folder`; (result, seconds)."""
    args = [a.format(**values) for a in args]
    cwd = os.getcwd()
    os.chdir(folder)
    started = time.monotonic()
    try:
        return run_cqil(*args), time.monotonic() - started
    finally:
        os.chdir(cwd)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("args,fragment", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) + f" #{i}"
                                                      for i, c in enumerate(CASES)])
def test_bad_input_fails_fast_in_one_line(args, fragment, inputs, no_weights_read, tmp_path):
    (tmp_path / "mymodels").mkdir()  # `mymodels/llama` is then a mistyped path, not a hub id
    before = tree(tmp_path)
    result, seconds = run_in(tmp_path, args, inputs)
    lines = result.err.strip().splitlines()
    assert result.code == 2, result.err
    assert len(lines) == 1 and lines[0].startswith("cqil: error: "), result.err
    assert fragment in lines[0], lines[0]
    assert "internal error" not in lines[0] and "Traceback" not in result.err
    assert seconds < WALL_S, f"{seconds:.1f} s"
    assert tree(tmp_path) == before  # no output, no temporary


def test_an_org_name_spec_offline_is_not_found_at_once(cqil, tmp_path, monkeypatch):
    """`mymodels/llama` without a `mymodels/` folder has a hub id's form: on a machine that
    cannot reach the Hub and has no cached copy, one line at once (not half a minute of
    retries)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    result = cqil("analyze", "mymodels/llama")
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1, result.err
    assert "model not found: no folder mymodels/llama" in lines[0] and "offline" in lines[0]
    assert time.monotonic() - started < WALL_S


def test_deprecated_spellings_warn_in_one_line_and_still_work(inputs, no_weights_read,
                                                               tmp_path):
    cases = [
        (CONVERT + ["--devices", "0"], "--devices is deprecated; use --group-size",
         "bad --group-size 0"),
        (CONVERT + ["--parallel", "0"], "--parallel is deprecated; use --group-size",
         "bad --group-size 0"),
        (CONVERT + ["--seq-len", "3"], "--seq-len is deprecated; use --window-len",
         "bad --window-len 3"),
        (CONVERT + ["--report", "missing.json"], "--report is deprecated; use --analysis",
         "--analysis missing.json: file not found"),
        (BENCH + ["--devices", "0"], "--devices is deprecated; use --ranks", "bad --ranks 0"),
        (GENERATE + ["--devices", "0"], "--devices is deprecated; use --ranks", "bad --ranks 0"),
        (CONVERT + ["--devices", "2", "--group-size", "2"], "deprecated", "give --group-size once"),
    ]
    for args, warning, error in cases:
        result, _ = run_in(tmp_path, args, inputs)
        lines = result.err.strip().splitlines()
        assert result.code == 2 and len(lines) == 2, result.err
        assert lines[0].startswith("cqil: warning: ") and warning in lines[0], result.err
        assert lines[1].startswith("cqil: error: ") and error in lines[1], result.err


def test_debug_after_the_command_shows_the_traceback(tmp_path):
    with pytest.raises(CqilError, match="model not found"):
        run_cqil("analyze", str(tmp_path / "nothing"), "--debug")


def test_an_explicit_encoding_reads_what_utf8_refuses(inputs):
    from cqil_cli.inputs.text import load_text
    from cqil_cli.inputs.text_files import use_encoding

    try:
        use_encoding("latin-1")
        assert load_text(str(inputs["latin1"])).documents == ("caf\u00e9 au lait, na\u00efve",)
    finally:
        use_encoding("utf-8")
    with pytest.raises(CqilError, match="byte 3 .0xe9."):
        load_text(str(inputs["latin1"]))


def test_help_does_not_import_torch():
    """`cqil --help` and `cqil CMD --help` in a fresh interpreter: torch never imported."""
    script = textwrap.dedent("""
        import sys
        from cqil_cli.cli.app import main
        for args in (["--help"], ["convert", "--help"], ["analyze", "--help"],
                     ["bench", "--help"], ["generate", "--help"], ["assets", "fetch", "--help"]):
            sys.argv = ["cqil", *args]
            try:
                main()
            except SystemExit as exc:
                assert exc.code in (0, None), (args, exc.code)
        print("torch imported:", "torch" in sys.modules, "transformers imported:",
              "transformers" in sys.modules, file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert "torch imported: False transformers imported: False" in proc.stderr, proc.stderr
    for section in ("What to convert:", "How to group:", "How to tune:", "Where to run:",
                    "Output:"):
        assert section in proc.stdout


STUCK = textwrap.dedent("""
    import hashlib, os, sys
    from pathlib import Path
    from cqil_cli.cli import app
    from cqil_cli.core.files import staged_folder

    @app.cli.command("stuck")
    def stuck():
        with staged_folder(Path(os.environ["STUCK_OUT"])):
            print("stuck: started", file=sys.stderr, flush=True)
            hashlib.pbkdf2_hmac("sha256", b"x", b"y", 2 ** 31 - 1)  # one native call, minutes

    sys.argv = ["cqil", "stuck"]
    app.main()
""")


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")
def test_sigterm_ends_a_native_call_within_5_s(tmp_path):
    """SIGTERM while the main thread is inside one long native call (the handler cannot run
    until it returns): the watchdog ends the process within the grace time, exit 143, one
    line, no output and no temporary folder left."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", STUCK], cwd=REPO, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO),
                                                STUCK_OUT=str(out)))
    try:
        assert proc.stderr.readline().strip() == "stuck: started"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        elapsed = time.monotonic() - sent
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["cqil: terminated"], err
    assert elapsed < 5.0, f"{elapsed:.1f} s"
    assert list(tmp_path.iterdir()) == []
