"""Ctrl-C and SIGTERM during a long `cqil convert`: exit 130 / 143 with one line, no output left.

The command runs in a child process (a signal to the test process itself is not the point):
`python -m cqil_cli convert` of a tiny model with a long tuning bound; once its progress line
"tuning" appears on stderr (plain lines: stderr is a pipe, not a terminal), the child gets the
signal. Neither --out nor a temporary `.out.tmp-*` folder may be left behind.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

import pytest

START_TIMEOUT_S = 600  # model load, latency, perplexity of the original: seconds, on any machine
EXIT_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def convert_text(tmp_path_factory):
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(6000)))
    return path


def _default_sigint() -> None:
    # A child inherits an ignored SIGINT from a shell that ran the tests in the background;
    # Python then keeps ignoring it. Ctrl-C's default, as in an interactive terminal:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum,code,line", [
    (signal.SIGTERM, 143, "cqil: terminated"),
    (signal.SIGINT, 130, "cqil: interrupted"),
], ids=["SIGTERM", "SIGINT"])
def test_signal_during_tuning_leaves_nothing(signum, code, line, llama_folder, convert_text,
                                             tmp_path):
    parent = tmp_path / "outputs"
    parent.mkdir()
    out = parent / "out"
    args = [sys.executable, "-m", "cqil_cli", "convert", str(llama_folder), "--out", str(out),
            "--groups", "1-2", "--group-size", "2", "--tune-minutes", "5",
            "--calib", str(convert_text), "--eval", str(convert_text), "--eval-ood", "none",
            "--device", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    stderr: list[str] = []
    tuning = threading.Event()

    def read_stderr() -> None:
        for text in proc.stderr:
            stderr.append(text)
            if text.startswith("tuning"):
                tuning.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not tuning.wait(0.2):
            assert proc.poll() is None, f"convert ended before tuning:\n{''.join(stderr)}"
            assert time.monotonic() < deadline, f"no tuning line:\n{''.join(stderr)}"
        proc.send_signal(signum)
        proc.wait(timeout=EXIT_TIMEOUT_S)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(stderr)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert [text.strip() for text in stderr].count(line) == 1, err
    assert err.rstrip().endswith(line), err
    assert list(parent.iterdir()) == []  # neither --out nor a temporary folder
