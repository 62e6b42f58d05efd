"""The edges of a forward pass, written once for every engine: what runs before the first step
(embedding and its scale; RoPE and attention masks, chosen by layer type) and after the last
(final norm, logits and their soft-cap; the next token, greedy or sampled).

The reference and fused engines (modeling_cqil.CqilModel), the distributed engine
(distributed_cqil.DistributedCqil), fast generation (fastgen.FastGenerator) and the latency
probes (cqil_cli/search/parallel_probe.py) all call these, so a family's edge (Gemma's
embedding scale and logit cap, Gemma 3's local RoPE, Phi-3's partial RoPE) is defined here and
in families_cqil.py only.

Self-contained (torch and its siblings configuration_cqil.py and families_cqil.py): copied next
to converted weights with the other runtime files (docs/runtime.md).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .configuration_cqil import FULL, SLIDING
from .families_cqil import embedding_multiplier, has_local_rope, make_rotary, softcap

# ----------------------------------------------------------------------------- before the steps


def scale_embeddings(config, x: torch.Tensor) -> torch.Tensor:
    """Token embeddings x [B, T, d] as the family feeds them to the first layer: Gemma's times
    sqrt(hidden) rounded to their dtype, Granite's times its embedding_multiplier, the others
    unchanged."""
    if getattr(config, "scale_embeddings", False):
        x = x * embedding_multiplier(config.hidden_size, x.dtype)
    multiplier = getattr(config, "embedding_multiplier", None)
    return x if multiplier is None else x * multiplier


def make_rotaries(config, device=None) -> dict[str, nn.Module]:
    """layer type -> its RoPE module: one module serves both types, but Gemma 3's sliding-window
    layers have their own (local base); Phi-3's covers part of each head (families_cqil)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        full = make_rotary(config, FULL)
        local = make_rotary(config, SLIDING) if has_local_rope(config) else None
    return {FULL: full, SLIDING: local if local is not None else full}


def rotaries_of(model) -> dict[str, nn.Module]:
    """layer type -> RoPE module of a CqilModel (its rotary_emb, and rotary_local where present:
    the modeling file of cqil 0.1 folders has none)."""
    local = getattr(model, "rotary_local", None)
    return {FULL: model.rotary_emb, SLIDING: local if local is not None else model.rotary_emb}


def rope_by_type(rotaries: dict, x: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """layer type -> (cos, sin) [B|1, T, r] of positions position_ids [B|1, T], each module run
    once (x gives the dtype and device)."""
    full = rotaries[FULL](x, position_ids)
    local = full if rotaries[SLIDING] is rotaries[FULL] else rotaries[SLIDING](x, position_ids)
    return {FULL: full, SLIDING: local}


def build_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, past: int,
    sliding_window: int | None, device: torch.device,
) -> tuple[torch.Tensor | None, bool]:
    """Return (bool mask [B|1, 1, q_len, past+q_len] or None, is_causal) for SDPA.

    Query i sits at cache position past+i. True = may attend. Keys are cache positions, so a
    sliding window counts cache slots like transformers does. The diagonal is always allowed:
    a left-padding query would otherwise have no key at all, and SDPA would return NaN there,
    which then leaks into every row through 0 * NaN in the value product.
    """
    kv_len = past + q_len
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2D [batch, past + new tokens] (1 = token, 0 = padding)")
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions, expected {kv_len} "
                f"({past} cached + {q_len} new)"
            )
        if bool(attention_mask.all()):
            attention_mask = None
    windowed = sliding_window is not None and kv_len > sliding_window
    if attention_mask is None and not windowed:
        if q_len == 1:
            return None, False  # one query sees the whole cache
        if past == 0:
            return None, True  # plain causal prefill: let SDPA pick its causal kernel
    q_pos = torch.arange(past, kv_len, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1, S]
    allowed = k_pos <= q_pos
    if windowed:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    allowed = allowed[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return allowed | (k_pos == q_pos), False


def window_of(config, kind: str) -> int | None:
    """The sliding window of layers of type `kind` (None: full attention)."""
    return config.sliding_window if kind == SLIDING else None


def masks_by_type(config, attention_mask: torch.Tensor | None, batch: int, q_len: int, past: int,
                  device) -> dict:
    """layer type -> build_attention_mask(...) for every type the config's layers use."""
    return {kind: build_attention_mask(attention_mask, batch, q_len, past, window_of(config, kind),
                                       device)
            for kind in sorted(set(config.layer_types))}


# ----------------------------------------------------------------------------- after the steps


def head_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What the family does to the lm_head's output [..., V] (or a rank's rows of it: every
    operation here is elementwise): Gemma 2's final soft-cap, Granite's division by
    logits_scaling, nothing for the others."""
    logits = softcap(logits, getattr(config, "final_logit_softcapping", None))
    scaling = getattr(config, "logits_scaling", None)
    return logits if scaling is None else logits / scaling


def final_logits(config, norm: nn.Module, lm_head, h: torch.Tensor) -> torch.Tensor:
    """Last hidden states h [..., d] -> logits [..., V]: the final norm (the family's module,
    Gemma's in fp32), lm_head (any callable [..., d] -> [..., V]), head_logits."""
    return head_logits(config, lm_head(norm(h)))


def sampling_scores(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """logits [B, V] -> the scores a token is drawn from (softmax of them): divided by the
    temperature, then -inf outside the top_k most likely tokens and outside the smallest set
    whose probability reaches top_p (the most likely token always stays), in the order
    transformers' logits warpers apply them."""
    scores = logits.float() / max(float(temperature), 1e-5)
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)  # [B, V]
        probs = ordered.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p  # the mass before the token already reaches p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return scores


def next_tokens(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of logits [B, V] -> [B]: the argmax, or a draw from
    softmax(sampling_scores(...)) with `generator` (on the CPU, so that the same logits and
    generator state give the same draw on every rank and engine, whatever its device)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = sampling_scores(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


__all__ = ["build_attention_mask", "final_logits", "head_logits", "make_rotaries", "masks_by_type",
           "next_tokens", "rope_by_type", "rotaries_of", "sampling_scores", "scale_embeddings",
           "window_of"]
