"""W local ranks started by torch's own launcher (torch.distributed.launcher.api.elastic_launch,
what torchrun runs), so that `--ranks W` on generate and bench (and convert --engine distributed) needs no torchrun
(docs/generate.md).

launch_local(entry, payload, W) runs entry(payload) on W ranks and returns rank 0's result.
A standalone rendezvous on 127.0.0.1 (port 0: the store picks a free one), no restarts. Each rank
runs in a fresh (spawned) interpreter (entry must be a module-level function and payload
picklable), its stdout and stderr kept in a log folder that is removed afterwards. When a rank
fails or dies, the launcher's agent stops the others (SIGTERM, then SIGKILL after
SHUTDOWN_TIMEOUT_S) and this module raises one CqilError line: the failing rank's own error line
(which run_rank writes) when it wrote one, else how it ended. A rank stuck in a collective fails
after COLLECTIVE_TIMEOUT_S (the process-group timeout its entry passes to init_distributed),
which ends the others the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import CqilError

COLLECTIVE_TIMEOUT_S = 30.0  # a rank waiting longer than this in a collective fails (bounded end)
SHUTDOWN_TIMEOUT_S = 5  # SIGTERM to SIGKILL of the other ranks once one has failed
MONITOR_INTERVAL_S = 0.2  # how often the agent looks at its ranks


def is_rank() -> bool:
    """Whether this process is already one rank of a launched group (torchrun set the
    environment): it must then run its part, not start ranks of its own."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_rank(entry: Callable[[Any], Any], payload: Any, error_dir: str | None = None) -> Any:
    """entry(payload) in this rank (RANK in the environment); a failure writes its one line to
    error_dir/rank{R}.txt (when given) before it propagates, so that the launcher can name it."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        return entry(payload)
    except BaseException as exc:
        if error_dir and not isinstance(exc, SystemExit):
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not isinstance(exc, CqilError):
                line = f"{type(exc).__name__}: {line}"
            Path(error_dir, f"rank{rank}.txt").write_text(line[:300] + "\n")
        raise


def launch_local(entry: Callable[[Any], Any], payload: Any, world_size: int,
                 name: str = "cqil") -> Any:
    """Run entry(payload) on world_size local processes; rank 0's result, or a CqilError."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    try:
        errors = work / "errors"
        errors.mkdir()
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=world_size,
            run_id=f"{name}-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
            monitor_interval=MONITOR_INTERVAL_S, start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=str(work / "logs"), redirects=Std.ALL),
            shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        try:
            with _quiet_launcher():
                results = elastic_launch(config, run_rank)(entry, payload, str(errors))
        except ChildFailedError as exc:
            raise CqilError(_failure_line(exc, errors)) from None
        if 0 not in results:
            raise CqilError("rank 0 returned no result")
        return results[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _failure_line(exc, errors: Path) -> str:
    """One line for a failed launch, naming the cause rather than its echo: a rank's own error
    line, else a rank that ended without one (a crash, a signal), else a rank that lost its
    peer (whose line says only that the connection broke)."""
    own = {int(p.stem[4:]): p.read_text().strip() for p in sorted(errors.glob("rank*.txt"))}
    for rank, line in sorted(own.items()):
        if not _lost_peer(line):
            return f"rank {rank} failed: {line}"
    silent = sorted(r for r in exc.failures if r not in own)
    if silent:
        code = exc.failures[silent[0]].exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"rank {silent[0]} {how} without an error message; every rank was stopped"
    rank, line = min(own.items())
    return f"rank {rank} failed: {line}"


def _lost_peer(line: str) -> bool:
    lowered = line.lower()
    return any(s in lowered for s in ("connection closed", "connection reset", "broken pipe",
                                      "timed out", "timeout", "peer"))


@contextmanager
def _quiet_launcher():
    """The launcher logs its configuration and every failure at length; cqil says one line."""
    loggers = [logging.getLogger(name) for name in (
        "torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
