"""Honest timing on any device: wait for queued GPU work before reading a clock."""

from __future__ import annotations

import torch


def synchronize(device: torch.device | str) -> None:
    """Block until `device` has finished its queued work (CUDA runs asynchronously; the CPU
    needs nothing)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
