"""The settings of `cqil convert`, defined once with their defaults and their checks.

Torch-free on purpose: the command line reads the defaults for --help from here.
Words used throughout convert (docs/convert.md):
  steps     the ordered list of what a generated token runs through; a step is one layer or a
            *group* of adjacent layers that run concurrently (config key `groups`)
  devices   P: the largest group, and the number of ranks of the placement
  tuning    the brief tuning after conversion (--tune-steps, --tune-minutes): a local stage
            (each changed block reconstructed on its own) then an end-to-end KL stage
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..calibrate.options import (
    DEFAULT_TUNE_MINUTES,
    LOCAL_LOSSES,
    LOCAL_PARAMS,
    LocalOptions,
    TuneOptions,
)
from ..core.errors import CqilError

STRATEGIES = ("cqil", "skip", "prune")
DEFAULT_BUDGET = 0.9  # decode latency as a fraction of the original's, when nothing is given
TUNE_STAGES = ("local", "e2e")  # in this order: block-wise reconstruction, then end-to-end KL
LOCAL_STARTS = ("least-squares", "none")
ENGINES = ("fused", "distributed")  # what a --budget is measured on (docs/convert.md)


@dataclass
class ConvertOptions:
    out: Path
    strategy: str = "cqil"
    devices: int = 2  # P: the largest group; ranks of the placement
    engine: str = "fused"  # the budget's engine: fused (one device) or distributed (W ranks)
    # How many steps: one of budget / speedup / steps / groups / start+end+group_size.
    budget: float | None = None
    speedup: float | None = None
    steps: int | None = None
    groups: str | None = None  # by hand: "14-15,16-17" or "none"
    start: int | None = None  # the papers' notation: groups of group_size from start to end
    end: int | None = None
    group_size: int | None = None  # --parallel
    bypass: int = 1
    tune_steps: int | None = None
    tune_minutes: float | None = None  # None: DEFAULT_TUNE_MINUTES unless tune_steps is given
    lora_rank: int = TuneOptions.lora_rank
    tune_stages: str = "local,e2e"  # which tuning stages run, in order; "none": no tuning
    local_params: str = LocalOptions.params  # what the local stage trains: full | lora
    local_loss: str = LocalOptions.loss  # nmse | cos-nmse
    local_start: str = "least-squares"  # the local stage's closed-form start, or none
    local_share: float = 0.5  # of --tune-minutes, the local stage's (when e2e follows)
    local_steps: int | None = None  # optimizer steps per block (None: --tune-steps)
    local_samples: int = LocalOptions.samples  # calibration windows the local stage caches
    calib: str = "default"
    eval: str = "default:heldout"
    eval_ood: str | None = "default:ood"  # out-of-domain text, reported beside --eval
    report: Path | None = None
    seed: int = 0
    force: bool = False
    calib_samples: int = 8  # sensitivity samples when no --report is given
    tune_samples: int = 256  # --tune-windows: calibration windows for tuning (seq_len tokens)
    seq_len: int = 256  # --seq-len: tokens per tuning and evaluation window
    eval_samples: int = 16  # --eval-windows: windows of --eval and --eval-ood scored
    eval_prompt: int | None = None  # tokens of each eval window that are prompt, not scored (None: half)
    candidates: int = 4  # best partitions re-measured whole

    @property
    def prompt_tokens(self) -> int:
        return self.seq_len // 2 if self.eval_prompt is None else self.eval_prompt

    @property
    def tune_bounds(self) -> tuple[int | None, float | None]:
        """(steps, minutes) of tuning; the first bound reached stops it."""
        if self.tune_steps is None and self.tune_minutes is None:
            return None, DEFAULT_TUNE_MINUTES
        return self.tune_steps, self.tune_minutes

    @property
    def calib_text(self) -> str:
        """--calib without a `+self` share: the text the measurements (sensitivity, the
        re-measured groupings) read; tuning also gets the model's own samples."""
        from ..inputs.text import split_self_share

        return split_self_share(self.calib)[0]

    @property
    def tunes(self) -> bool:
        steps, minutes = self.tune_bounds
        return (steps or 0) + (minutes or 0) > 0 and bool(self.stages)

    @property
    def stages(self) -> tuple[str, ...]:
        """The tuning stages to run, in order (checked by check())."""
        names = tuple(name.strip() for name in self.tune_stages.lower().split(",") if name.strip())
        return () if names == ("none",) else names

    def local_options(self, minutes: float | None) -> LocalOptions:
        """The local stage's settings, bounded by `minutes` (None: by steps only)."""
        steps = self.local_steps if self.local_steps is not None else self.tune_bounds[0]
        return LocalOptions(steps=steps, minutes=minutes, params=self.local_params,
                            loss=self.local_loss, closed_form=self.local_start != "none",
                            lora_rank=self.lora_rank, samples=self.local_samples,
                            seed=self.seed)

    @property
    def manual(self) -> bool:
        """Steps given by hand (--groups, or --start/--end/--parallel)."""
        return self.groups is not None or self.start is not None or self.end is not None \
            or self.group_size is not None

    def check(self) -> None:
        """Every check that needs no model: a one-line CqilError for the first problem."""
        if self.strategy not in STRATEGIES:
            raise CqilError(f"strategy '{self.strategy}' is not available ({', '.join(STRATEGIES)})")
        if self.strategy != "cqil" and self.manual:
            raise CqilError("--groups and --start/--end/--parallel apply to --strategy cqil only")
        if self.strategy == "skip" and self.steps is not None and self.steps < 2:
            raise CqilError(f"bad --steps {self.steps}: layer skipping keeps at least 2 layers "
                            "(the first and the last)")
        if self.strategy == "skip" and self.report is not None:
            raise CqilError("--report applies to --strategy cqil and prune (skip chooses its "
                            "layers by rule, not by measurement)")
        if self.seq_len < 4:
            raise CqilError(f"bad --seq-len {self.seq_len}: at least 4 tokens")
        for name, value in (("--tune-windows", self.tune_samples),
                            ("--eval-windows", self.eval_samples)):
            if value < 1:
                raise CqilError(f"bad {name} {value}: at least 1")
        if not 0 <= self.prompt_tokens <= self.seq_len - 2:
            raise CqilError(f"bad --eval-prompt {self.prompt_tokens}: between 0 and "
                            f"{self.seq_len - 2} (windows are {self.seq_len} tokens)")
        if self.devices < 1:
            raise CqilError(f"bad --devices {self.devices}: at least 1")
        if self.bypass < 0:
            raise CqilError(f"bad --bypass {self.bypass}: 0 or more")
        if self.engine not in ENGINES:
            raise CqilError(f"bad --engine '{self.engine}': {' or '.join(ENGINES)}")
        self.check_tuning()
        self.budget_fraction()
        check_output_dir(self.out, self.force)

    def check_tuning(self) -> None:
        stages = self.stages
        if self.tune_stages.strip().lower() != "none" and (
                not stages or any(s not in TUNE_STAGES for s in stages)
                or list(stages) != sorted(set(stages), key=TUNE_STAGES.index)):
            raise CqilError(f"bad --tune-stages '{self.tune_stages}': local, e2e or local,e2e "
                            "(in that order), or none")
        if self.local_params not in LOCAL_PARAMS:
            raise CqilError(f"bad --local-params '{self.local_params}': "
                            f"{' or '.join(LOCAL_PARAMS)}")
        if self.local_loss not in LOCAL_LOSSES:
            raise CqilError(f"bad --local-loss '{self.local_loss}': {' or '.join(LOCAL_LOSSES)}")
        if self.local_start not in LOCAL_STARTS:
            raise CqilError(f"bad --local-start '{self.local_start}': "
                            f"{' or '.join(LOCAL_STARTS)}")
        if not 0 < self.local_share < 1:
            raise CqilError(f"bad --local-share {self.local_share}: a fraction in (0, 1)")
        if self.local_steps is not None and self.local_steps < 0:
            raise CqilError(f"bad --local-steps {self.local_steps}: 0 or more")
        if self.local_samples < 1:
            raise CqilError(f"bad --local-windows {self.local_samples}: at least 1")

    def budget_fraction(self) -> float | None:
        """The decode-latency fraction to meet, or None when steps/groups fix the depth."""
        chosen = [x for x in (self.budget, self.speedup, self.steps, self.groups, self.start)
                  if x is not None]
        if len(chosen) > 1:
            raise CqilError("give one of --budget, --speedup, --steps, --groups, or "
                            "--start/--end/--parallel")
        if self.budget is not None:
            if not 0 < self.budget <= 1:
                raise CqilError(f"bad --budget {self.budget}: a fraction in (0, 1]")
            return self.budget
        if self.speedup is not None:
            if self.speedup < 1:
                raise CqilError(f"bad --speedup {self.speedup}: at least 1")
            return 1.0 / self.speedup
        if not chosen and not self.manual:
            return DEFAULT_BUDGET
        return None


def check_output_dir(out: Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CqilError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CqilError(f"--out {out} is not empty; pass --force to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CqilError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CqilError(f"cannot write {out}: permission denied")
