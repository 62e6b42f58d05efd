"""Settings of tuning (the end-to-end and local stages), defined once (and without importing
torch, so the command line can show their defaults in --help cheaply)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TUNE_MINUTES = 3.0  # the tuning bound when no other is given


@dataclass
class TuneOptions:
    steps: int | None = None  # stop after this many optimizer steps …
    minutes: float | None = DEFAULT_TUNE_MINUTES  # … or this much wall time, whichever first
    lora_rank: int = 16
    lr_bypass: float = 2e-3
    lr_lora: float = 1e-3
    batch_size: int = 4
    precision: str = "auto"  # auto | bf16 (autocast) | fp32 (fp32 compute, also
    # for a bf16 model: calibrate/precision.py)
    seed: int = 0


LOCAL_PARAMS = ("full", "lora")  # what the local stage trains in each block (besides β, γ)
LOCAL_LOSSES = ("nmse", "cos-nmse")  # its loss: see calibrate/reconstruct.py


@dataclass
class LocalOptions:
    """The local (block-wise) reconstruction stage (calibrate/reconstruct.py)."""

    steps: int | None = None  # optimizer steps per block …
    minutes: float | None = 1.5  # … or this much wall time for the whole stage, whichever first
    params: str = "full"  # full: every weight of the block's layers; lora: adapters
    loss: str = "nmse"
    closed_form: bool = True  # least-squares start of the down projections
    ridge: float = 10.0  # its ridge λ: ridge / n × the mean diagonal of UᵀU (n windows cached)
    lora_rank: int = 16
    lr_full: float = 1e-4
    lr_lora: float = 1e-3
    lr_bypass: float = 2e-3
    batch_size: int = 4  # windows per optimizer step
    cache_batch: int = 8  # windows per pass without gradients (caching, the closed form): 16
    # ran no faster on a 2-core CPU (256-token windows) and held 0.1 GB more at the peak
    samples: int = 128  # at most this many calibration windows are cached …
    cache_share: float = 0.75  # … and with `minutes`, as many as caching fits in this share
    precision: str = "auto"
    seed: int = 0
