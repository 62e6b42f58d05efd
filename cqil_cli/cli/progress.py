"""Progress of long steps: rich bars on a terminal, plain lines elsewhere.

When stderr is not a terminal (a Makefile pipeline, CI, a log file) rich draws nothing until the
end, so a long step looks like a hang. There, `PlainProgress` prints one line when a task starts,
one when it ends, and a line for every unfinished task at least every `every` seconds, from a
background timer, so even one slow step (a model load, a perplexity pass) shows signs of life.
Both objects offer the part of rich's Progress API the commands use: add_task, update, console.
"""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_EVERY_S = 30.0


def open_progress(console: Console, quiet: bool, every: float = PLAIN_EVERY_S):
    if quiet or console.is_terminal:
        return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"),
                        TimeRemainingColumn(), console=console, disable=quiet, transient=False)
    return PlainProgress(console, every)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


class PlainProgress:
    """Line-by-line progress for a console that is not a terminal (see the module doc)."""

    def __init__(self, console: Console, every: float = PLAIN_EVERY_S):
        self.console = console
        self.every = every
        self._tasks: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._last_line = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self._thread = threading.Thread(target=self._heartbeat, name="cqil-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        return False

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        with self._lock:
            task_id = len(self._tasks)
            self._tasks[task_id] = {"description": description, "total": total, "completed": 0,
                                    "start": time.monotonic(), "done": False}
            self._print(task_id)
        return task_id

    def update(self, task_id: int, advance: float | None = None, completed: float | None = None,
               description: str | None = None, **_) -> None:
        with self._lock:
            task = self._tasks[task_id]
            if completed is not None:
                task["completed"] = completed
            if advance:
                task["completed"] += advance
            if description is not None:
                task["description"] = description
            total = task["total"]
            if total and not task["done"] and task["completed"] >= total:
                task["done"] = True
                self._print(task_id)
            elif time.monotonic() - self._last_line >= self.every:
                self._print(task_id)

    def _print(self, task_id: int) -> None:
        task = self._tasks[task_id]
        count = f"{task['completed']:g}/{task['total']:g}" if task["total"] else f"{task['completed']:g}"
        self.console.print(f"{task['description']}: {count}  "
                           f"[{_clock(time.monotonic() - task['start'])}]", highlight=False)
        self._last_line = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(self.every, 5.0)):
            with self._lock:
                if time.monotonic() - self._last_line < self.every:
                    continue
                running = [i for i, t in self._tasks.items() if not t["done"]]
                if running:
                    for task_id in running:
                        self._print(task_id)
                else:
                    self.console.print(f"still working  [{time.strftime('%H:%M:%S')}]",
                                       highlight=False)
                    self._last_line = time.monotonic()
