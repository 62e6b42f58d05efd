"""Quality of a model on windows of text: perplexity, and the KL a grouping costs untuned.

Both take ids [n, L] (n windows of L tokens) and run them batch by batch without gradients;
the metrics themselves are core/metrics.py's. Used by convert (search re-measurement, held-out
perplexity before and after tuning) and by the benchmarks.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from ..core.metrics import TokenMetrics, perplexity_of, summed_kl
from ..runtime.checkpoint import build_cqil_model
from ..runtime.edges_cqil import head_logits


def prompt_kwargs(model, prompt_tokens: int) -> dict:
    """forward() arguments that make a skip model treat the first prompt_tokens as its prompt."""
    if not getattr(model.config, "skip_layers", None):
        return {}
    return {"prompt_length": max(prompt_tokens, 1)}  # a generation needs at least one prompt token


def last_logits(model, ids: torch.Tensor, keep: int, **kwargs) -> torch.Tensor:
    """Logits [B, keep, V] of the last `keep` positions of a forward over ids [B, T] (all T
    when keep is 0): the head runs on those positions only (transformers' logits_to_keep),
    which halves the logits' memory when half of a window is prompt. A model whose forward
    lacks logits_to_keep (older remote code) computes them all and is sliced."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, use_cache=False, logits_to_keep=keep, **kwargs).logits
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    return logits[:, -keep:] if keep else logits


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch_size: int = 4, prompt_tokens: int = 0) -> float:
    """exp(mean next-token NLL) of model on ids [n, L], batch by batch.

    The first prompt_tokens tokens of each window are the prompt: context, not scored (a model
    with skip_layers runs them through every layer, as its prompt). Scored are tokens
    prompt_tokens..L-1, predicted from positions prompt_tokens-1..L-2, i.e. exactly the tokens
    a generation after that prompt would produce (teacher-forced).
    """
    device = next(model.parameters()).device
    start = max(prompt_tokens - 1, 0)  # the first scored prediction
    extra = prompt_kwargs(model, prompt_tokens)
    metrics = TokenMetrics()
    L = ids.shape[1]
    for batch in ids.split(batch_size):
        batch = batch.to(device)  # [b, L]
        # Only the scored positions start..L-2 reach the head: [b, L - 1 - start, V]
        logits = last_logits(model, batch[:, :-1], L - 1 - start, **extra)
        metrics.update(None, logits, batch[:, start + 1:])
    return perplexity_of(metrics.mean_nll)


def head_of(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Final-normed hidden states [..., d] -> logits [..., V] of a cqil or a plain transformers
    causal LM: lm_head, then the final soft-cap where the config has one (Gemma 2). With
    model.model(...).last_hidden_state (after the final norm in both), the logits of forward()."""
    if hasattr(model, "compute_logits"):
        return model.compute_logits
    return lambda h: head_logits(model.config, model.lm_head(h))  # the family's, as every engine


@torch.no_grad()
def grouping_kl(base_model, groups, bypass: int, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean per-token KL(original ‖ grouped, untuned) on ids [n, L], over every position.

    groups: a grouping as build_cqil_model takes it (lists of layers or a spec string); bypass: its bypass
    distance. The grouped model is built here (untuned: γ = β = 1) and dropped afterwards. The
    two models' final hidden states [b, L, d] go through the (shared) head a chunk of positions
    at a time (summed_kl's head): their [b, L, V] logits never exist whole.
    """
    model = build_cqil_model(base_model, groups, bypass, share_outside_layers=True, packed=True)
    device = next(base_model.parameters()).device
    total, count = 0.0, 0
    for batch in ids.split(batch_size):
        batch = batch.to(device)  # [b, L]
        reference = base_model.model(input_ids=batch, use_cache=False).last_hidden_state
        grouped = model.model(input_ids=batch, use_cache=False).last_hidden_state
        total += summed_kl(reference, grouped, head=head_of(model))
        count += batch.numel()
        del reference, grouped
    del model
    return total / count


__all__ = ["grouping_kl", "head_of", "last_logits", "perplexity", "prompt_kwargs"]
