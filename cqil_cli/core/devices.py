"""Honest timing on any device: wait for queued GPU work before reading a clock; a process's
peak memory, and handing freed memory back."""

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


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere).

    glibc serves big tensors from mmap only until the first is freed; it then raises its mmap
    threshold (up to 32 MB), so later ones come from the heap, and freeing them keeps the pages
    resident. A phase that frees a model-sized set of tensors (a latency variant, a tuned
    block's caches) and is followed by one that allocates as much would otherwise peak with
    both. Call it between such phases, not in a loop: it walks the whole heap."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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
