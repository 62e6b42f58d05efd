"""The settings of one `cqil bench` run, checked before anything loads (docs/bench.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..core.errors import CqilError


@dataclass
class BenchOptions:
    """Every setting of a run; the report's `settings` are these fields (in this order)."""

    prompt_len: int = 128
    new_tokens: int = 32
    batches: tuple[int, ...] = (1,)
    repeats: int = 5
    warmup: int = 1
    eval_spec: str = "default:heldout"
    eval_tokens: int = 8192
    eval_window: int = 256
    eval_prompt: int | None = None  # prompt tokens of a window, not scored (None: half)
    eval_batch: int = 2  # windows per teacher-forced forward pass (memory, not results)
    greedy_prompts: int = 16
    greedy_prompt_len: int = 32
    greedy_tokens: int = 32
    seed: int = 0
    cqil_engine: bool = False  # also run plain checkpoints (and the baseline) on cqil's engine
    compile: bool = False  # torch.compile cqil's decode step
    latency: bool = True
    quality: bool = True
    devices: int = 1  # W > 1: also decode latency on W ranks of the distributed engine

    def check(self) -> None:
        if self.prompt_len < 1:
            raise CqilError(f"bad --prompt-len {self.prompt_len}: it must be at least 1")
        if self.new_tokens < 2:
            raise CqilError(f"bad --new-tokens {self.new_tokens}: at least 2 are needed "
                            "(the first token belongs to the prefill)")
        if self.repeats < 1 or self.warmup < 0:
            raise CqilError("--repeats must be at least 1 and --warmup at least 0")
        if self.eval_window < 2:
            raise CqilError(f"bad --eval-window {self.eval_window}: it must be at least 2")
        if not 0 <= self.eval_prompt_tokens <= self.eval_window - 2:
            raise CqilError(f"bad --eval-prompt {self.eval_prompt_tokens}: between 0 and "
                            f"{self.eval_window - 2} for windows of {self.eval_window} tokens")
        if self.eval_tokens < self.eval_window:
            raise CqilError(f"bad --eval-tokens {self.eval_tokens}: it must be at least one "
                            f"window of {self.eval_window} tokens")
        if self.greedy_prompts < 1 or self.greedy_prompt_len < 1 or self.greedy_tokens < 1:
            raise CqilError("the greedy-continuation test needs at least 1 prompt of 1 token "
                            "and 1 new token")
        if self.devices < 1:
            raise CqilError(f"bad --devices {self.devices}: at least 1")
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
