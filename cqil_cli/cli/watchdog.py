"""SIGTERM (and Ctrl-C) end any phase within seconds.

Python runs a signal handler in the main thread between two bytecodes, so while the main thread
sits in one long native call (a forward pass over a very long window, a matmul of a large
model) the handler waits for it: minutes, once. The C-level handler still writes the signal's
number to a wakeup file descriptor at once; a watcher thread reads it and, if the process has
not ended GRACE_S later, removes the temporaries of outputs in progress
(core.files.IN_PROGRESS), prints the same last line the handler would, and ends the process
with the same exit code (143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

GRACE_S = 3.0  # the handler's turn; then the process is ended from the watcher thread


class Watchdog:
    """Installed by `with Watchdog():` around a command, in the main thread; a no-op elsewhere."""

    def __init__(self, grace_s: float = GRACE_S):
        self.grace_s = grace_s
        self.previous_fd = None
        self.reader = self.writer = None
        self.done = threading.Event()

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        try:
            self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError):
            self._close()
            return self
        threading.Thread(target=self._watch, name="cqil-signal-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        if self.writer is not None:
            try:
                self.writer.send(b"\0")  # wakes the watcher, which then sees `done`
            except OSError:
                pass
            signal.set_wakeup_fd(self.previous_fd if self.previous_fd is not None else -1)
            self._close()

    def _close(self) -> None:
        for sock in (self.writer, self.reader):
            if sock is not None:
                sock.close()
        self.reader = self.writer = None

    def _watch(self) -> None:
        reader = self.reader
        while not self.done.is_set():
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    threading.Thread(target=self._force_exit, args=(signum,), daemon=True).start()
                    return

    def _force_exit(self, signum: int) -> None:
        if self.done.wait(self.grace_s):
            return  # the handler ended the command in time
        from ..core.files import remove_in_progress

        remove_in_progress()
        line = "cqil: terminated" if signum == signal.SIGTERM else "cqil: interrupted"
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        finally:
            os._exit(128 + signum)
