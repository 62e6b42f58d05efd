"""core/: outputs that appear whole or not at all, schema tags, the metrics; cli/progress.py."""

from __future__ import annotations

import io
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from cqil_cli.cli.progress import PlainProgress, open_progress
from cqil_cli.core.documents import Schema, read_json
from cqil_cli.core.errors import CqilError
from cqil_cli.core.files import staged_folder, write_file_atomic, write_json_atomic
from cqil_cli.core.metrics import (
    TokenMetrics,
    log_probs,
    mean_kl,
    mean_kl_of_hidden,
    next_token_nll,
    perplexity_of,
    token_kl,
    token_nll,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- core.files


def test_staged_folder_becomes_the_target_with_usual_permissions(tmp_path, umask_022):
    target = tmp_path / "out"
    with staged_folder(target) as folder:
        assert folder.is_dir() and not any(folder.iterdir())
        assert folder.parent.name.startswith(".out.tmp-") and folder.parent.parent == tmp_path
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(b"1234")
        (folder / "config.json").write_text("{}")
        assert not target.exists()  # nothing at the target until the block ends
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "sub" / "weights.bin").read_bytes() == b"1234"
    assert mode(target) == 0o755 and mode(target / "sub") == 0o755
    assert mode(target / "config.json") == 0o644 and mode(target / "sub" / "weights.bin") == 0o644


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_staged_folder_leaves_nothing_on_an_exception(tmp_path, error):
    target = tmp_path / "out"
    with pytest.raises(type(error)):
        with staged_folder(target) as folder:
            (folder / "half.bin").write_bytes(b"12")
            raise error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_staged_folder_keeps_the_old_target_on_an_exception(tmp_path, error):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(type(error)):
        with staged_folder(target, replace=True) as folder:
            (folder / "new.txt").write_text("new")
            raise error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]


def test_staged_folder_replaces_only_when_asked(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with staged_folder(target) as folder:
            (folder / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with staged_folder(target, replace=True) as folder:
        (folder / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone too


def test_staged_folder_creates_missing_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with staged_folder(target) as folder:
        (folder / "x").write_text("x")
    assert (target / "x").read_text() == "x"


def test_write_file_atomic_usual_permissions_and_nothing_left_on_failure(tmp_path, umask_022):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and mode(path) == 0o644
    write_file_atomic(tmp_path / "plot.png", lambda tmp: tmp.write_bytes(b"\x89PNG"))
    assert mode(tmp_path / "plot.png") == 0o644
    for error in (RuntimeError("disk full"), KeyboardInterrupt()):
        def failing(tmp, error=error):
            tmp.write_text("half")
            raise error

        with pytest.raises(type(error)):
            write_file_atomic(path, failing)
        assert json.loads(path.read_text()) == {"a": 1}  # the old file is untouched
        with pytest.raises(type(error)):
            write_file_atomic(tmp_path / "new.txt", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "report.json"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_json_atomic(tmp_path / "private.json", {})
        with staged_folder(tmp_path / "out") as folder:
            (folder / "f").write_text("")
    finally:
        os.umask(old)
    assert mode(tmp_path / "private.json") == 0o600
    assert mode(tmp_path / "out") == 0o700 and mode(tmp_path / "out" / "f") == 0o600


# --------------------------------------------------------------------------- core.documents

SCHEMA = Schema("cqil.analyze", 2, "a `cqil analyze --json` report", "run `cqil analyze` again")


def one_line_error(data) -> str:
    with pytest.raises(CqilError) as info:
        SCHEMA.check(data, "r.json")
    message = str(info.value)
    assert "\n" not in message and message.startswith("r.json: ")
    return message


def test_schema_check_accepts_its_own_tag():
    data = {"schema": "cqil.analyze/2", "x": 1}
    assert SCHEMA.check(data, "r.json") is data
    assert SCHEMA.tag == "cqil.analyze/2"


def test_schema_check_names_what_is_wrong():
    older = one_line_error({"schema": "cqil.analyze/1"})
    assert "older cqil" in older and "cqil.analyze/1" in older and "run `cqil analyze` again" in older
    newer = one_line_error({"schema": "cqil.analyze/3"})
    assert "newer cqil" in newer and "upgrade cqil" in newer
    foreign = one_line_error({"schema": "cqil.bench/2"})
    assert "not a `cqil analyze --json` report" in foreign and "'cqil.bench/2'" in foreign
    assert "expected cqil.analyze/2" in foreign
    untagged = one_line_error({"groups": []})
    assert "schema None" in untagged
    assert "JSON object" in one_line_error([1, 2])
    assert "JSON object" in one_line_error("cqil.analyze/2")


def test_schema_require_and_read_json(tmp_path):
    with pytest.raises(CqilError, match="without groups, window"):
        SCHEMA.require({"schema": "cqil.analyze/2"}, ("groups", "window"), "r.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CqilError, match="is not valid JSON"):
        read_json(tmp_path / "bad.json", "the report")
    with pytest.raises(CqilError, match="cannot read the report"):
        read_json(tmp_path / "missing.json", "the report")


# --------------------------------------------------------------------------- core.metrics

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32


def random_logits(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3


def test_token_nll_and_next_token_nll_equal_cross_entropy():
    logits = random_logits(3, 7, 50)  # [B, T, V]
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    want = F.cross_entropy(logits.reshape(-1, 50), ids.reshape(-1), reduction="none").view(3, 7)
    torch.testing.assert_close(token_nll(log_probs(logits), ids), want, **TOL)
    want_next = F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1),
                                reduction="none").view(3, 6)
    torch.testing.assert_close(next_token_nll(log_probs(logits), ids), want_next, **TOL)


def test_token_kl_equals_kl_div_and_is_differentiable():
    p_logits, q_logits = random_logits(4, 5, 30, seed=2), random_logits(4, 5, 30, seed=3)
    log_p, log_q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    want = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    torch.testing.assert_close(token_kl(log_probs(p_logits), log_probs(q_logits)), want, **TOL)
    torch.testing.assert_close(mean_kl(p_logits, q_logits), want.mean(), **TOL)
    assert float(mean_kl(p_logits, p_logits)) == pytest.approx(0, abs=1e-6)
    q = q_logits.clone().requires_grad_(True)
    token_kl(log_probs(p_logits), log_probs(q)).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


@pytest.mark.parametrize("rows", [1, 3, 64])  # chunks of rows: uneven, and all rows at once
def test_chunked_kl_of_hidden_equals_kl_of_logits_and_its_gradient(monkeypatch, rows):
    """The tuning loss in chunks: the same value and gradient as mean_kl of the whole logits
    (fp32, 1e-5 relative), with a soft-capped head as Gemma 2's."""
    import cqil_cli.core.metrics as metrics

    monkeypatch.setattr(metrics, "_CHUNK_VALUES", rows * 40)  # V = 40
    g = torch.Generator().manual_seed(4)
    lm_head = torch.nn.Linear(12, 40, bias=False)
    lm_head.weight.requires_grad_(False)

    def head(h):
        return 30.0 * torch.tanh(lm_head(h) / 30.0)

    reference = torch.randn(3, 5, 12, generator=g)
    base = torch.randn(3, 5, 12, generator=g)
    chunked, whole = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    loss = mean_kl_of_hidden(reference, chunked * 2.0, head)
    want = mean_kl(head(reference), head(whole * 2.0))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    (3.0 * loss).backward()
    (3.0 * want).backward()
    torch.testing.assert_close(chunked.grad, whole.grad, rtol=1e-5, atol=1e-7)


def test_log_probs_computes_in_fp32():
    logits = random_logits(2, 10).to(torch.bfloat16)
    out = log_probs(logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.log_softmax(logits.float(), -1), **TOL)


def test_token_metrics_equal_direct_computation():
    B, T, V = 5, 9, 40
    ref, logits = random_logits(B, T, V, seed=4), random_logits(B, T, V, seed=5)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(6))
    nll = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                  reduction="none").sum(-1).mean()
    agree = (ref.argmax(-1) == logits.argmax(-1)).float().mean()

    metrics = TokenMetrics()
    metrics.update(ref[:2], logits[:2], targets[:2], chunk=7)  # batches and chunks of any size
    metrics.update(ref[2:], logits[2:], targets[2:], chunk=64)
    result = metrics.result()
    assert result["tokens"] == B * T
    assert result["nll"] == pytest.approx(float(nll), rel=1e-5)
    assert result["ppl"] == pytest.approx(float(nll.exp()), rel=1e-5)
    assert result["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert result["top1_agreement"] == pytest.approx(float(agree))

    alone = TokenMetrics()  # the reference itself: KL 0, agreement 1
    alone.update(None, ref, targets, chunk=4)
    assert alone.result()["kl"] == 0 and alone.result()["top1_agreement"] == 1
    assert alone.mean_nll == pytest.approx(float(F.cross_entropy(ref.reshape(-1, V),
                                                                 targets.reshape(-1))), rel=1e-5)
    with pytest.raises(ValueError, match="vocabularies differ"):
        TokenMetrics().update(ref[..., :-1], logits, targets)


def test_perplexity_is_capped_instead_of_overflowing():
    assert perplexity_of(0.0) == 1.0
    assert perplexity_of(2.0) == pytest.approx(7.389056, rel=1e-6)
    assert perplexity_of(1e6) == perplexity_of(700.0) < float("inf")


# --------------------------------------------------------------------------- cli.progress


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=120), buffer


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll until predicate() holds (no assumption about how fast the machine is)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_plain_progress_prints_start_heartbeat_and_completion():
    console, buffer = plain_console()
    with PlainProgress(console, every=0.2) as progress:
        task = progress.add_task("loading model", total=3)
        assert buffer.getvalue().splitlines()[0] == "loading model: 0/3  [0:00]"
        # no update at all for a while: the background timer still prints the task
        assert wait_for(lambda: len(buffer.getvalue().splitlines()) >= 2), buffer.getvalue()
        assert all(line.startswith("loading model: 0/3  [") for line in buffer.getvalue().splitlines())
        progress.update(task, advance=1)
        progress.update(task, completed=3, description="loaded")
        assert buffer.getvalue().splitlines()[-1].startswith("loaded: 3/3  [")
        # every task finished and nothing happens: "still working" lines
        assert wait_for(lambda: "still working" in buffer.getvalue()), buffer.getvalue()
    stopped = len(buffer.getvalue().splitlines())
    time.sleep(0.5)
    assert len(buffer.getvalue().splitlines()) == stopped  # the timer stops with the block
    assert not [t for t in threading.enumerate() if t.name == "cqil-progress"]


def test_plain_progress_counts_without_a_total():
    console, buffer = plain_console()
    with PlainProgress(console, every=60) as progress:
        task = progress.add_task("windows")
        progress.update(task, advance=2)
    assert buffer.getvalue().splitlines() == ["windows: 0  [0:00]"]


def test_open_progress_is_plain_off_a_terminal():
    console, _ = plain_console()
    assert isinstance(open_progress(console, quiet=False), PlainProgress)
    assert not isinstance(open_progress(console, quiet=True), PlainProgress)
