"""The tokens every bench entry sees: the tokenizer check and the windows drawn from --eval.

The evaluation text is tokenised once with the baseline's tokenizer; three sets of
non-overlapping windows are drawn from it, deterministically for --seed (docs/bench.md,
"How every number is measured").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import CqilError
from .options import BenchOptions

# Punctuation, digits, a dash and accents: two tokenizers that split this alike agree on text.
_PROBE = "Shall I compare thee to a summer's day?\n  Thou art more lovely — 1911, naïve."


def check_same_tokenizer(a, b, name_a: str, name_b: str) -> None:
    """Refuse a comparison whose token ids mean different things."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only = len(set(va) ^ set(vb))
        detail = (f"{len(va):,} vs {len(vb):,} tokens" if len(va) != len(vb) else
                  f"{only:,} tokens differ" if only else "the same tokens with different ids")
        raise CqilError(f"the tokenizers of '{name_a}' and '{name_b}' differ ({detail}); "
                        "quality and latency can only be compared on the same tokens")
    if a(_PROBE, add_special_tokens=False)["input_ids"] != \
            b(_PROBE, add_special_tokens=False)["input_ids"]:
        raise CqilError(f"the tokenizers of '{name_a}' and '{name_b}' differ (same vocabulary, "
                        "different splitting); quality and latency can only be compared on the "
                        "same tokens")


@dataclass
class BenchTokens:
    eval_windows: torch.Tensor  # [W, eval_window] teacher-forced quality windows
    greedy_prompts: torch.Tensor  # [G, greedy_prompt_len]
    prompts: dict[int, torch.Tensor]  # batch size B -> [B, prompt_len] latency prompts
    stream_tokens: int  # tokens of the whole evaluation text


def bench_tokens(tokenizer, options: BenchOptions) -> BenchTokens:
    """Tokenise options.eval_spec and draw the windows the measurements need (empty tensors for
    a measurement that is switched off)."""
    from ..inputs.text import load_text, token_stream

    stream = token_stream(tokenizer, load_text(options.eval_spec))
    windows = torch.empty(0, options.eval_window, dtype=torch.long)
    greedy = torch.empty(0, options.greedy_prompt_len, dtype=torch.long)
    if options.quality:
        windows = _draw(stream, options.eval_windows, options.eval_window, options.seed,
                        f"--eval-tokens {options.eval_tokens}", options.eval_spec,
                        "--eval-tokens")
        greedy = _draw(stream, options.greedy_prompts, options.greedy_prompt_len,
                       options.seed + 1, f"{options.greedy_prompts} greedy prompts",
                       options.eval_spec, "--greedy-prompts")
    prompts = {}
    if options.latency or options.devices > 1:
        # The first B windows of the largest batch's: batch 1's prompt is also in batch 8.
        biggest = max(options.batches)
        pool = _draw(stream, biggest, options.prompt_len, options.seed + 2, f"batch {biggest}",
                     options.eval_spec, "--batch or --prompt-len")
        prompts = {b: pool[:b].clone() for b in options.batches}
    return BenchTokens(windows, greedy, prompts, stream.numel())


def _draw(stream: torch.Tensor, count: int, length: int, seed: int, what: str, spec: str,
          option: str) -> torch.Tensor:
    """count non-overlapping windows of length tokens [count, length], drawn for a seed; too
    little text is a CqilError that names the option to lower."""
    from ..inputs.text import draw_windows

    return draw_windows(stream, count, length, seed, spec=spec, purpose=f"for {what}",
                        hint=f"; too little evaluation text: use more or lower {option}")
