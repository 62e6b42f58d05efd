"""Settings of `cqil analyze`, defined once with their command-line options (core/options.py),
without importing torch, so that --help shows them cheaply."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import CqilError
from ..core.options import option

SAMPLE_TOKENS = 128  # --seq-len: also the length of convert's own sensitivity windows


@dataclass
class AnalyzeInputs:
    """The calibration windows the measurements read."""

    calib: str = option("default", "Calibration text spec.", metavar="TEXT")
    samples: int = option(8, "Number N of calibration samples.", min=1)
    seq_len: int = option(SAMPLE_TOKENS, "Tokens L per sample; also the prompt length of the "
                          "latency test.", min=2)
    seed: int = option(0, "Which calibration windows are drawn.")


@dataclass
class AnalyzeOptions:
    # W: similarity pairs up to j−i ≤ W; sensitivity groups of 2..W adjacent layers
    window: int = option(4, "W: similarity for layer pairs up to W apart; sensitivity for "
                         "every group of 2..W adjacent layers (cost grows with W).", min=2,
                         default_text="4, or the number of layers if fewer")
    batch_size: int = option(4, "Samples per forward pass (memory, not results).", min=1)
    repeats: int = option(5, "Latency repeats after one warm-up (median reported).", min=1)
    # sensitivity as the KL at the output (quadratic in layers) instead of each group's local
    # error at its own output (linear): analyze/profile.py
    exact_kl: bool = option(
        False, "Sensitivity as each group's KL at the model's output (and its change of "
        "next-token loss): the rest of the model runs after every candidate, so the cost grows "
        "with the square of the number of layers. Default: each group's local error at its own "
        "output, linear in layers × W.")
    sensitivity: bool = option(True, "Skip the per-group sensitivity.", flag="--no-sensitivity")
    latency: bool = option(True, "Skip the latency measurement.", flag="--no-latency")


def check_window(window: int, num_layers: int) -> None:
    if not 2 <= window <= num_layers:
        raise CqilError(f"bad --window {window}: between 2 and the number of layers "
                        f"({num_layers})")
