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
    """This process's peak resident set size, in bytes: VmHWM of /proc/self/status (the peak of
    this address space, so a process started by fork + exec does not inherit its parent's
    size, as getrusage's ru_maxrss does), else ru_maxrss (kB on Linux, bytes on macOS).
    bench/memory.py measures one block's peak instead."""
    import re
    import resource
    import sys
    from pathlib import Path

    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        match = None
    if match:
        return int(match.group(1)) * 1024
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
