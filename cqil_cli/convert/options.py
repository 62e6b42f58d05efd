"""The settings of `cqil convert`, defined once with their defaults and their checks.

Torch-free on purpose: the command line reads the defaults for --help from here.
Words used throughout convert (docs/convert.md):
  steps     the ordered list of what a generated token runs through; a step is one layer or a
            *group* of adjacent layers that run concurrently (config key `groups`)
  group size P: the largest group, and the number of ranks of the placement (--group-size)
  tuning    the brief tuning after conversion (--tune-steps, --tune-minutes): a local stage
            (each changed block reconstructed on its own) then an end-to-end KL stage
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..calibrate.options import (
    DEFAULT_TUNE_MINUTES,
    LOCAL_LOSSES,
    LOCAL_PARAMS,
    LocalOptions,
    TuneOptions,
)
from ..core.documents import read_json
from ..core.errors import CqilError
from ..core.files import check_folder_writable
from ..core.groups import parse_group_spec
from ..core.options import check_ranges, option
from ..search.partitions import uniform_groups

STRATEGIES = ("cqil", "skip", "prune")
DEFAULT_BUDGET = 0.9  # decode latency as a fraction of the original's, when nothing is given
TUNE_STAGES = ("local", "e2e")  # in this order: block-wise reconstruction, then end-to-end KL
LOCAL_STARTS = ("least-squares", "none")
ENGINES = ("fused", "distributed")  # what a --budget is measured on (docs/convert.md)
SENSITIVITY_SAMPLE_TOKENS = 128  # convert's own sensitivity windows: analyze's --seq-len default

WEIGHT_FORMATS = ("int8", "int4")  # runtime/quant_cqil.py FORMATS (torch-free here)
WEIGHT_METHODS = ("gptq", "local", "rtn")  # calibrate/quantize.py METHODS
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel runs (others: the reference)

WHAT, GROUP, TUNE, WEIGHTS, OUTPUT = ("What to convert", "How to group", "How to tune",
                                      "Weights", "Output")


@dataclass
class ConvertOptions:
    """Every setting of `cqil convert`; each field with option(...) is its command-line option
    (flag, help, range and --help section are declared here only)."""

    out: Path = option(help="Folder to write.", metavar="DIR", section=OUTPUT, kind=str)
    strategy: str = option(
        "cqil", "cqil: concurrent groups of adjacent layers with a learned bypass; skip: "
        "Unified Layer Skipping (the prompt runs through every layer, generated tokens through "
        "evenly spaced ones; --speedup R uses the paper's rule); prune: remove the layers of "
        "lowest block influence (ShortGPT), a plain model.", choices=STRATEGIES, section=WHAT)
    calib: str = option(
        "default", "Calibration text (sensitivity, search, tuning): a text spec (docs/inputs.md), "
        "e.g. default or mix; TEXT+self[=SHARE] makes SHARE (default 0.25) of the tuning "
        "windows text the model samples itself.", metavar="TEXT", section=WHAT)
    eval: str = option("default:heldout", "Held-out text for the perplexities in the manifest.",
                       metavar="TEXT", section=WHAT)
    eval_ood: str | None = option(
        "default:ood", "Out-of-domain text, reported beside --eval ('none' to skip).",
        metavar="TEXT", section=WHAT)
    window_len: int = option(
        256, "Tokens per window of tuning and of the held-out and out-of-domain perplexities "
        "(not analyze's --seq-len: see docs/convert.md).", metavar="L", min=4, section=WHAT,
        aliases=("--seq-len",))
    eval_windows: int = option(16, "Windows of --eval and of --eval-ood scored, at most.",
                               metavar="N", min=1, section=WHAT)
    eval_prompt: int | None = option(
        None, "Tokens at the start of each evaluation window that are the prompt, not scored "
        "(skip runs them through every layer). Default: half of --window-len.", metavar="N",
        min=0, section=WHAT, kind=int)
    analysis: Path | None = option(
        None, "Reuse a `cqil analyze --json` report instead of measuring sensitivity again.",
        metavar="PATH", section=WHAT, aliases=("--report",), kind=str)
    seed: int = option(0, "Which calibration and evaluation windows are drawn; tuning's seed.",
                       section=WHAT)
    # How many steps: one of budget / speedup / steps / groups / start+end.
    budget: float | None = option(
        None, "Decode latency as a fraction of the original's on the --engine (whole model; "
        "with --weights on the fused engine, the original quantized alike). "
        f"Default when nothing else is given: {DEFAULT_BUDGET}.", min=0, max=1, min_open=True,
        section=GROUP, kind=float)
    speedup: float | None = option(None, "Decode speed-up instead of --budget (1/budget).",
                                   min=1, section=GROUP, kind=float)
    steps: int | None = option(None, "Number of sequential steps instead of a budget.", min=1,
                               section=GROUP, kind=int)
    groups: str | None = option(
        None, "Groups by hand: 14-15,16-17 (inclusive ranges; other layers stay single) or none.",
        metavar="SPEC", section=GROUP)
    start: int | None = option(None, "The papers' notation: first grouped layer (0-based) ...",
                               min=0, section=GROUP, kind=int)
    end: int | None = option(None, "... end of the grouped range (exclusive), in groups of "
                             "--group-size.", min=1, section=GROUP, kind=int)
    group_size: int = option(
        2, "P: the largest group (with --start/--end: the size of every group), and the number "
        "of ranks of the placement.", metavar="P", min=1, section=GROUP,
        aliases=("--devices", "--parallel"))
    bypass: int = option(1, "Bypass distance D: each layer's MLP also sees the attention of the "
                         "D layers before it in its group (0: none).", min=0, section=GROUP)
    engine: str = option(
        "fused", "What --budget is measured on: fused (cqil's engine on this one device, the "
        "original on the same) or distributed (the distributed engine on --group-size local "
        "ranks, the original under tensor parallelism on those ranks; its alpha-beta latency "
        "model is measured first and recorded in the manifest).", choices=ENGINES,
        section=GROUP)
    tune_steps: int | None = option(
        None, "Tuning steps (0: no tuning): of the end-to-end stage, and of each block in the "
        "local stage unless --local-steps is given.", min=0, section=TUNE, kind=int)
    tune_minutes: float | None = option(
        None, "Tuning wall-time bound for all stages together (0: no tuning); the first bound "
        f"reached stops. Default: {DEFAULT_TUNE_MINUTES:g} unless --tune-steps is given.",
        min=0, section=TUNE, kind=float)
    tune_stages: str = option(
        "local,e2e", "Tuning stages, in order: local (each changed block trained to reproduce "
        "the original layers' output on cached activations, block after block), e2e (KL "
        "distillation of the whole model), local,e2e, or none.", metavar="STAGES",
        section=TUNE)
    tune_windows: int = option(256, "Calibration windows tuning draws its batches from, at "
                               "most.", metavar="N", min=1, section=TUNE)
    lora_rank: int = option(
        TuneOptions.lora_rank, "LoRA rank of the end-to-end stage (and of --local-params lora), "
        "merged before writing (0: bypass weights only).", min=0, section=TUNE)
    local_params: str = option(
        LocalOptions.params, "What the local stage trains in each block: every weight of its "
        "layers, or LoRA (--lora-rank) merged after the block; plus the bypass weights.",
        choices=LOCAL_PARAMS, section=TUNE)
    local_loss: str = option(
        LocalOptions.loss, "The local stage's loss: nmse (squared error over the energy of the "
        "original block's change of the residual stream), or cos-nmse (nmse + 1 − cosine).",
        choices=LOCAL_LOSSES, section=TUNE)
    local_start: str = option(
        "least-squares", "The local stage's closed-form start: each block's down projections "
        "set by ridge least squares on the cached activations (kept only if it helps).",
        choices=LOCAL_STARTS, section=TUNE)
    local_share: float = option(
        0.5, "The local stage's share of --tune-minutes when e2e follows (e2e gets the rest, "
        "including what the local stage leaves unused).", min=0, max=1, min_open=True,
        max_open=True, section=TUNE)
    local_steps: int | None = option(
        None, "Optimizer steps per block in the local stage (default: --tune-steps).", min=0,
        section=TUNE, kind=int)
    local_windows: int = option(
        LocalOptions.samples, "Calibration windows the local stage caches, at most; under "
        "--tune-minutes as many as fit in 3/4 of its time.", min=1, section=TUNE)
    weights: str | None = option(
        None, "Store the linear layers' weights quantized: int8 (per output channel) or int4 "
        "(groups of --weight-group-size input columns); the head in int8, the embedding and "
        "norms as they are. Default: the model's dtype. MODEL may be a converted folder: its "
        "steps and tuning are kept, only the weights change.", choices=WEIGHT_FORMATS,
        section=WEIGHTS, kind=str)
    weight_group_size: int = option(
        32, "int4: input columns per scale and zero (32, 64, 128 or 256 run the fast CPU "
        "kernel; it must divide every layer's input width).", metavar="G", min=2,
        section=WEIGHTS)
    weight_method: str | None = option(
        None, "How the codes are chosen (default: local for int4, gptq for int8, each the one "
        "that recovered most on the default model): local (every step's weights trained on the "
        "calibration windows with the rounding in the loop, straight-through, for "
        "--weight-minutes, then rounded to nearest: what is trained is what is stored), gptq "
        "(each column's rounding error spread over the columns not yet rounded, using the "
        "calibration windows' statistics) or rtn (round to nearest, no calibration).",
        choices=WEIGHT_METHODS, section=WEIGHTS, kind=str)
    weight_windows: int | None = option(
        None, "Calibration windows the method reads, at most (default: local 16, gptq 64).",
        metavar="N", min=1, section=WEIGHTS, kind=int)
    weight_minutes: float = option(
        1.5, "local: minutes of training, caching included.", metavar="M", min=0,
        min_open=True, section=WEIGHTS)
    force: bool = option(False, "Replace a non-empty --out folder.", section=OUTPUT)
    calib_samples: int = 8  # sensitivity samples when no --analysis is given
    candidates: int = 4  # best partitions re-measured whole

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.analysis is not None:
            self.analysis = Path(self.analysis)
        if isinstance(self.eval_ood, str) and self.eval_ood.strip().lower() == "none":
            self.eval_ood = None

    @property
    def prompt_tokens(self) -> int:
        return self.window_len // 2 if self.eval_prompt is None else self.eval_prompt

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
                            lora_rank=self.lora_rank, samples=self.local_windows,
                            seed=self.seed)

    @property
    def manual(self) -> bool:
        """Steps given by hand (--groups, or --start/--end)."""
        return self.groups is not None or self.start is not None or self.end is not None

    def check(self) -> None:
        """Every check that needs no model: a one-line CqilError for the first problem."""
        check_ranges(self)
        if self.strategy != "cqil" and self.manual:
            raise CqilError("--groups and --start/--end apply to --strategy cqil only")
        if (self.start is None) != (self.end is None):
            raise CqilError("--start and --end go together (groups of --group-size between them)")
        if self.strategy == "skip" and self.steps is not None and self.steps < 2:
            raise CqilError(f"bad --steps {self.steps}: layer skipping keeps at least 2 layers "
                            "(the first and the last)")
        if self.strategy == "skip" and self.analysis is not None:
            raise CqilError("--analysis applies to --strategy cqil and prune (skip chooses its "
                            "layers by rule, not by measurement)")
        if not 0 <= self.prompt_tokens <= self.window_len - 2:
            raise CqilError(f"bad --eval-prompt {self.prompt_tokens}: between 0 and "
                            f"{self.window_len - 2} (windows are {self.window_len} tokens)")
        self.check_tuning()
        if self.weights == "int4" and self.weight_group_size % 2:
            raise CqilError(f"bad --weight-group-size {self.weight_group_size}: int4 needs an even "
                            f"group size ({', '.join(map(str, INT4_GROUP_SIZES))} run fastest)")
        self.budget_fraction()
        check_output_dir(self.out, self.force)
        if self.analysis is not None and not self.analysis.is_file():
            raise CqilError(f"--analysis {self.analysis}: file not found (write one with "
                            "`cqil analyze MODEL --json PATH`)")

    def check_model(self, num_layers: int, max_positions: int | None,
                    widths: tuple[int, ...] = ()) -> None:
        """The checks that need only the model's config (config.json: its layer count,
        positions and the linear layers' input widths), done before its weights load: the
        grouping, --steps, the windows' length, int4's group size, the --analysis report's
        shape."""
        if self.groups is not None:
            try:
                steps = parse_group_spec(self.groups, num_layers)
            except ValueError as exc:
                raise CqilError(f"bad --groups: {exc}") from exc
            widest = max(len(g) for g in steps)
            if widest > self.group_size:
                raise CqilError(f"--groups has a group of {widest} layers: pass --group-size "
                                f"{widest} (the largest group; now {self.group_size})")
        if self.start is not None:
            uniform_groups(self.start, self.end, self.group_size, num_layers)
        if self.steps is not None and self.steps > num_layers:
            raise CqilError(f"bad --steps {self.steps}: between 1 and {num_layers} (the model "
                            f"has {num_layers} layers)")
        fewest = -(-num_layers // self.group_size)
        if self.strategy == "cqil" and self.steps is not None and self.steps < fewest:
            raise CqilError(f"--steps {self.steps} cannot be met with groups of at most "
                            f"{self.group_size} layers: the fewest is {fewest} (or pass a "
                            "larger --group-size)")
        if self.strategy == "cqil" and self.group_size > num_layers:
            raise CqilError(f"bad --group-size {self.group_size}: at most {num_layers} (the "
                            "model's layers)")
        if self.weights == "int4" and widths:
            misfit = sorted({w for w in widths if w % self.weight_group_size})
            if misfit:
                raise CqilError(f"--weight-group-size {self.weight_group_size} does not divide the "
                                f"model's layer input width {misfit[0]}: pick a divisor of "
                                f"{', '.join(map(str, sorted(set(widths))))}")
        if max_positions and self.window_len > max_positions:
            raise CqilError(f"bad --window-len {self.window_len}: at most {max_positions} (the "
                            "model's positions, max_position_embeddings)")
        if self.analysis is not None and self.strategy != "skip" and not self.manual:
            check_analysis_file(self.analysis, num_layers,
                                self.group_size if self.strategy == "cqil" else 1)

    def check_tuning(self) -> None:
        stages = self.stages
        if self.tune_stages.strip().lower() != "none" and (
                not stages or any(s not in TUNE_STAGES for s in stages)
                or list(stages) != sorted(set(stages), key=TUNE_STAGES.index)):
            raise CqilError(f"bad --tune-stages '{self.tune_stages}': local, e2e or local,e2e "
                            "(in that order), or none")

    def budget_fraction(self) -> float | None:
        """The decode-latency fraction to meet, or None when steps/groups fix the depth."""
        chosen = [x for x in (self.budget, self.speedup, self.steps, self.groups, self.start)
                  if x is not None]
        if len(chosen) > 1:
            raise CqilError("give one of --budget, --speedup, --steps, --groups, or "
                            "--start/--end")
        if self.budget is not None:
            return self.budget
        if self.speedup is not None:
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
    check_folder_writable(out.parent if str(out.parent) else Path("."), f"--out {out}")


def check_analysis_file(path: Path, num_layers: int, group_size: int) -> None:
    """An `cqil analyze --json` report that fits the model, read without torch (the whole
    document is checked again where it is used)."""
    data = read_json(path, f"--analysis {path}")
    schema = str(data.get("schema", "")) if isinstance(data, dict) else ""
    if not schema.startswith("cqil.analyze/"):
        raise CqilError(f"--analysis {path} is not a `cqil analyze --json` report")
    if data.get("num_layers") != num_layers:
        raise CqilError(f"--analysis {path} describes {data.get('num_layers')} layers; the "
                        f"model has {num_layers}")
    window = data.get("window") or 0
    if window < group_size or not data.get("groups"):
        raise CqilError(f"--analysis {path} has sensitivity for groups up to {window} layers; "
                        f"--group-size {group_size} needs `cqil analyze --window {group_size}`")
