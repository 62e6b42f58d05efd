"""PeakMemory: the peak memory of a block of work, on CUDA or on the CPU (docs/bench.md)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..core.devices import peak_rss_bytes, release_freed_memory

MB = 1024.0 * 1024.0


class PeakMemory:
    """Peak memory while a block runs.

    cuda: torch.cuda.max_memory_allocated (reset before the block): the peak of tensors the
          caching allocator handed out, weights of every loaded model included.
    cpu:  the process's peak resident set size (VmHWM from /proc/self/status, reset through
          /proc/self/clear_refs after glibc's malloc_trim returned freed pages to the system;
          where that is not possible, ru_maxrss, which cannot be reset), weights included.
    `peak_mb` is the absolute peak, `extra_mb` the peak above the level when the block began
    (the working memory of the run: activations, KV cache, logits).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        self.peak_mb = float("nan")
        self.extra_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._resettable = _reset_rss_peak()
            if not self._resettable:
                self.kind = "cpu_max_rss_since_start"
            self._start = _rss_bytes()
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_peak_bytes(self._resettable)
        self.peak_mb = peak / MB
        self.extra_mb = max(peak - self._start, 0) / MB
        return False

    def to_json(self) -> dict:
        """The report's `peak_memory`: {kind, peak_mb, extra_mb}."""
        return {"kind": self.kind, "peak_mb": self.peak_mb, "extra_mb": self.extra_mb}


def _proc_status(field_name: str) -> int | None:
    """A "NAME:  N kB" field of /proc/self/status in bytes; None where there is none."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.M)
    return int(match.group(1)) * 1024 if match else None


def _reset_rss_peak() -> bool:
    release_freed_memory()  # hand freed heap pages back first, so the peak shows this run's own growth
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one
        return _proc_status("VmHWM") is not None
    except OSError:
        return False


def _rss_bytes() -> int:
    rss = _proc_status("VmRSS")
    if rss is not None:
        return rss
    return _ru_maxrss()


def _ru_maxrss() -> int:
    """The process's peak since it started (the fallback where the peak cannot be reset)."""
    return peak_rss_bytes()


def _rss_peak_bytes(resettable: bool) -> int:
    if resettable:
        peak = _proc_status("VmHWM")
        if peak is not None:
            return peak
    return _ru_maxrss()
