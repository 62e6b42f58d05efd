"""The settings of one `cqil bench` run, checked before anything loads (docs/bench.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..core.errors import CqilError
from ..core.options import check_ranges, option

LATENCY, QUALITY, MODELS = "Latency test", "Quality test", "What to compare"


@dataclass
class BenchOptions:
    """Every setting of a run; the report's `settings` are these fields (in this order). Each
    field with option(...) is also its command-line option."""

    prompt_len: int = option(128, "Prompt tokens of the latency test (windows of the --eval "
                             "text).", min=1, section=LATENCY)
    new_tokens: int = option(32, "Tokens generated per latency run (the first belongs to the "
                             "prefill).", min=2, section=LATENCY)
    batches: tuple[int, ...] = option((1,), "Batch sizes of the latency test, e.g. 1,4,8.",
                                      flag="--batch", metavar="B[,B...]", kind=tuple,
                                      section=LATENCY)
    repeats: int = option(5, "Timed rounds; in each, every model runs once (round-robin).",
                          min=1, section=LATENCY)
    warmup: int = option(1, "Untimed runs per model and batch size first (reported apart).",
                         min=0, section=LATENCY)
    eval_spec: str = option("default:heldout", "Held-out text for the quality test (any text "
                            "spec).", flag="--eval", metavar="TEXT", section=QUALITY)
    eval_tokens: int = option(8192, "Tokens of teacher-forced evaluation.", min=2,
                              section=QUALITY)
    eval_window: int = option(256, "Tokens per evaluation window (convert's --window-len).",
                              min=2, section=QUALITY)
    eval_prompt: int | None = option(
        None, "Leading tokens of each evaluation window that are the prompt, not scored "
        "(default: half the window; 0 scores every token).", metavar="N", min=0, kind=int,
        section=QUALITY)
    eval_batch: int = 2  # windows per teacher-forced forward pass (memory, not results)
    greedy_prompts: int = option(16, "Prompts of the greedy-continuation test.", min=1,
                                 section=QUALITY)
    greedy_prompt_len: int = 32  # = --greedy-tokens on the command line
    greedy_tokens: int = option(32, "Greedy tokens generated after each prompt (its length "
                                "too).", min=1, section=QUALITY)
    seed: int = option(0, "Which text windows are drawn.", section=QUALITY)
    cqil_engine: bool = option(
        False, "Also run plain checkpoints of the families cqil converts (and the baseline) on "
        "cqil's engine, to separate the engine's gain from the grouping's.", section=MODELS)
    compile: bool = option(False, "torch.compile cqil's decode step (warm-up then includes "
                           "compilation).", section=LATENCY)
    latency: bool = option(True, "Quality only.", flag="--no-latency", section=MODELS)
    quality: bool = option(True, "Latency only.", flag="--no-quality", section=MODELS)
    # W > 1: also decode latency on W ranks of the distributed engine (the JSON key stays
    # `devices`, the report's schema)
    devices: int = option(
        1, "W > 1: also time the baseline and every MODEL on W local ranks of cqil's "
        "distributed engine (the original under tensor parallelism), with each rank's weight "
        "bytes and peak memory.", flag="--ranks", metavar="W", min=1, aliases=("--devices",),
        section=MODELS)

    def __post_init__(self) -> None:
        self.batches = parse_batches(self.batches)

    def check(self) -> None:
        check_ranges(self)
        if not 0 <= self.eval_prompt_tokens <= self.eval_window - 2:
            raise CqilError(f"bad --eval-prompt {self.eval_prompt_tokens}: between 0 and "
                            f"{self.eval_window - 2} for windows of {self.eval_window} tokens")
        if self.eval_tokens < self.eval_window:
            raise CqilError(f"bad --eval-tokens {self.eval_tokens}: it must be at least one "
                            f"window of {self.eval_window} tokens")
        if self.greedy_prompt_len < 1:
            raise CqilError("the greedy-continuation test needs prompts of at least 1 token")
        if not self.latency and not self.quality and self.devices == 1:
            raise CqilError("nothing to measure: both latency and quality are switched off")

    @property
    def eval_prompt_tokens(self) -> int:
        """The prompt of each evaluation window: --eval-prompt, else half the window (at most
        window - 2, so that at least one token is scored)."""
        if self.eval_prompt is None:
            return max(0, min(self.eval_window // 2, self.eval_window - 2))
        return self.eval_prompt

    @property
    def eval_windows(self) -> int:
        return self.eval_tokens // self.eval_window


def parse_batches(text: str | int | list | tuple) -> tuple[int, ...]:
    """'1,4,8' -> (1, 4, 8). Positive integers, no repeats; anything else is a CqilError."""
    if isinstance(text, int):
        text = str(text)
    if isinstance(text, (list, tuple)):
        text = ",".join(str(t) for t in text)
    parts = [p.strip() for p in str(text).split(",")]
    sizes: list[int] = []
    for part in parts:
        if not re.fullmatch(r"[0-9]+", part or "") or int(part) < 1:
            raise CqilError(f"bad batch list '{text}': expected positive integers separated by "
                            "commas, e.g. 1,4,8")
        if int(part) in sizes:
            raise CqilError(f"bad batch list '{text}': batch size {int(part)} is listed twice")
        sizes.append(int(part))
    return tuple(sizes)
