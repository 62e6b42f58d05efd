"""Honest timing on any device: wait for queued GPU work before reading a clock; a process's
peak memory."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str) -> None:
    """Block until `device` has finished its queued work (CUDA runs asynchronously; the CPU
    needs nothing)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started, in bytes (getrusage's
    ru_maxrss: kB on Linux, bytes on macOS). bench/memory.py measures a block's peak instead."""
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class CallTimer:
    """Wraps a callable (a model's forward) and records the duration of every call in seconds,
    the device synchronised before and after (the first call of a generation is the prefill,
    each later one a decode step)."""

    def __init__(self, fn, device):
        self.fn, self.device, self.durations = fn, device, []

    def __call__(self, *args, **kwargs):
        synchronize(self.device)
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        synchronize(self.device)
        self.durations.append(time.perf_counter() - start)
        return out
