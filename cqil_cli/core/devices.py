"""Honest timing on any device: wait for queued GPU work before reading a clock."""

from __future__ import annotations

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
