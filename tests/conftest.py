"""Shared fixtures: the offline tokenizer, tiny random models saved as Hugging Face folders,
a text file, and `cqil` run in this process the way the console script runs it."""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_models import FAMILIES, save_offline_tokenizer, save_tiny

# ../shared beside the checkout: fixtures every developer and CI run has (read-only).
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The offline byte-level tokenizer (tests/tiny_models.py), saved to a folder."""
    return save_offline_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def default_tokenizer_dir(tokenizer_dir) -> Path:
    """An alias of tokenizer_dir, for the tests that still use the old name."""
    return tokenizer_dir


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_folder(request, tmp_path_factory, tokenizer_dir) -> Path:
    """A saved tiny random model of each family of runtime/family_table_cqil.py in turn (its
    first tiny example), with the offline tokenizer."""
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param),
                     tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory, tokenizer_dir) -> Path:
    """One saved tiny Llama (5 layers, GQA), for tests that need any model."""
    return save_tiny("llama-gqa", tmp_path_factory.mktemp("llama"), tokenizer_dir=tokenizer_dir)


@pytest.fixture()
def text_file(tmp_path) -> Path:
    """About 7,000 characters of English words in a seeded random order (no period, so that
    every window of its tokens is found once)."""
    words = ("it was the best of times it was the worst of times the age of wisdom the age of "
             "foolishness the epoch of belief the season of light and darkness the spring of "
             "hope the winter of despair we had everything before us we had nothing").split()
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
                 for _ in range(140)]
    path = tmp_path / "user.txt"
    path.write_text(" ".join(sentences))
    return path


@pytest.fixture()
def umask_022():
    """The usual umask 022 during the test: outputs should then be 0644 files, 0755 folders."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- the CLI in-process


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def error_line(self) -> str:
        """The one "cqil: error: ..." line of stderr (asserts there is exactly one)."""
        lines = [line for line in self.err.splitlines() if line.startswith("cqil: error:")]
        assert len(lines) == 1, self.err
        return lines[0]


def run_cqil(*args) -> CliResult:
    """`cqil ARGS` through cqil_cli.cli.app.main in this process, as the console script runs it
    (one-line errors, exit codes), with stdout and stderr captured. The SIGTERM handler and the
    environment variables that main() sets are restored afterwards."""
    from cqil_cli.cli.app import main

    argv, environ = sys.argv, dict(os.environ)
    sigterm = signal.getsignal(signal.SIGTERM)
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["cqil", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, sigterm)
        os.environ.clear()
        os.environ.update(environ)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture()
def cqil():
    """run_cqil, for tests that take it as a fixture."""
    return run_cqil


def assert_clean_error(result: CliResult, *fragments: str) -> None:
    """Exit code 2, no traceback, one "cqil: error:" line that holds every fragment."""
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    line = result.error_line()
    for fragment in fragments:
        assert fragment in line, line
