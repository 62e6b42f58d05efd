"""The quality measurement of `cqil bench`: every entry against the baseline, on --eval text
(docs/bench.md, "Quality").

Teacher-forced: --eval-tokens tokens in windows of --eval-window tokens, batch by batch (no
logits kept); the first --eval-prompt tokens of each window (default: half) are the prompt and
are not scored, the rest is scored as the continuation a generation would produce (a
layer-skipping model runs the prompt through every layer and the rest through its kept ones):
perplexity from the model's own next-token loss, mean KL(baseline || model) per token, top-1
next-token agreement (core/metrics.py). Greedy: --greedy-tokens new tokens after each of
--greedy-prompts prompts, the share identical to the baseline's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.errors import CqilError
from ..core.metrics import TokenMetrics
from .options import BenchOptions
from .plan import Entry
from .tokens import BenchTokens


def greedy_match(base_tokens: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    """(share of identical continuations, share of identical tokens), both [N, n_new]."""
    if base_tokens.shape != tokens.shape:
        raise ValueError(f"continuations differ in shape: {tuple(base_tokens.shape)} vs "
                         f"{tuple(tokens.shape)}")
    same = base_tokens.cpu() == tokens.cpu()
    return float(same.all(dim=1).float().mean()), float(same.float().mean())


@torch.no_grad()
def run_quality(entries: list[Entry], baseline: Entry, tokens: BenchTokens,
                options: BenchOptions, advance: Callable[[str], None]) -> None:
    """Fill entry.quality for every entry (the baseline included), batch by batch.

    Entries that share a model and an engine (quality_key) are evaluated once.
    """
    distinct: dict[tuple, Entry] = {}
    for entry in [baseline] + entries:
        distinct.setdefault(entry.quality_key, entry)
    others = [e for k, e in distinct.items() if k != baseline.quality_key]
    metrics = {k: TokenMetrics() for k in distinct}
    p = options.eval_prompt_tokens
    start = max(p - 1, 0)  # the first scored prediction: the prompt's last position
    for batch in tokens.eval_windows.split(options.eval_batch):  # [b, eval_window] each
        inputs, targets = batch[:, :-1], batch[:, 1:][:, start:]
        scored = targets.shape[1]  # logits of the scored positions only: [b, scored, V]
        base_logits = baseline.runner.logits(inputs, p, keep=scored)
        metrics[baseline.quality_key].update(None, base_logits, targets)
        for entry in others:
            logits = entry.runner.logits(inputs, p, keep=scored)
            _update_against_baseline(metrics[entry.quality_key], base_logits, logits, targets)
        del base_logits
        advance("quality: teacher-forced windows")
    base_greedy = baseline.runner.greedy(tokens.greedy_prompts, options.greedy_tokens).cpu()
    advance(f"quality: greedy continuations of {baseline.label}")
    results = {}
    for key, entry in distinct.items():
        quality = metrics[key].result()
        if key == baseline.quality_key:
            seq, tok = 1.0, 1.0
        else:
            cont = entry.runner.greedy(tokens.greedy_prompts, options.greedy_tokens)
            seq, tok = greedy_match(base_greedy, cont)
            advance(f"quality: greedy continuations of {entry.label}")
        quality["greedy_match"] = seq
        quality["greedy_token_match"] = tok
        results[key] = quality
    for entry in [baseline] + entries:
        entry.quality = dict(results[entry.quality_key])


def _update_against_baseline(metrics: TokenMetrics, base_logits: torch.Tensor,
                             logits: torch.Tensor, targets: torch.Tensor) -> None:
    try:
        metrics.update(base_logits, logits, targets)
    except ValueError as exc:  # TokenMetrics refuses logits over different vocabularies
        raise CqilError(f"the model predicts {logits.shape[-1]} tokens but the baseline "
                        f"{base_logits.shape[-1]}: their vocabularies differ") from exc
