"""Settings of `cqil analyze`'s measurements, defined once (and without importing torch, so the
command line can show their defaults in --help cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AnalyzeOptions:
    window: int = 4  # W: similarity pairs up to j−i ≤ W; sensitivity groups of 2..W layers
    batch_size: int = 4
    repeats: int = 5  # latency repeats after one warm-up
    sensitivity: bool = True
    latency: bool = True
    exact_kl: bool = False  # sensitivity as the KL at the output (quadratic in layers) instead
    # of each group's local error at its own output (linear): analyze/profile.py
