"""Settings of the calibration measurements and of tuning, defined once (and without importing
torch, so the command line can show their defaults in --help cheaply)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TUNE_MINUTES = 3.0  # the tuning bound when no other is given


@dataclass
class AnalyzeOptions:
    window: int = 4  # W: similarity pairs up to j−i ≤ W; sensitivity groups of 2..W layers
    batch_size: int = 4
    repeats: int = 5  # latency repeats after one warm-up
    sensitivity: bool = True
    latency: bool = True


@dataclass
class TuneOptions:
    steps: int | None = None  # stop after this many optimizer steps …
    minutes: float | None = DEFAULT_TUNE_MINUTES  # … or this much wall time, whichever first
    lora_rank: int = 16
    lr_bypass: float = 2e-3
    lr_lora: float = 1e-3
    batch_size: int = 4
    precision: str = "auto"  # auto | bf16 | fp32 (autocast dtype of forward/backward)
    seed: int = 0
