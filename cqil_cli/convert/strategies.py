"""Comparison strategies: which layers to keep.

prune  ShortGPT (Men et al., 2024): remove the layers of lowest block influence
       1 − cos(input, output); the result is a plain base-architecture model with fewer layers.
skip   Unified Layer Skipping (Liu et al., 2024): for an integer speed-up r keep M = ⌊N/r⌋
       layers, always the first and the last, the others at multiples of ⌊N/(M−1)⌋; evenly
       spaced for a fractional r. The prompt runs through every layer, generated tokens
       through the kept ones (modeling_cqil's skip_layers).
"""

from __future__ import annotations

import math

from torch import nn

from ..core.errors import CqilError


def skip_kept_layers(num_layers: int, speedup: float) -> list[int]:
    if speedup < 1:
        raise CqilError(f"bad speed-up {speedup}: at least 1")
    keep = max(2, math.floor(num_layers / speedup))
    if keep >= num_layers:
        return list(range(num_layers))
    if float(speedup).is_integer():
        stride = num_layers // (keep - 1)
        middle = [k * stride for k in range(1, keep - 1)]
        kept = sorted({0, num_layers - 1, *middle})
        if len(kept) == keep:
            return kept
    # Fractional r (or an integer r whose multiples collide): evenly spaced, ends included.
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def skip_kept_layers_for_count(num_layers: int, keep: int) -> list[int]:
    """ULS layers for a layer count: the integer rule when N/keep is an integer, else evenly spaced."""
    if not 2 <= keep <= num_layers:
        raise CqilError(f"layer skipping keeps between 2 and {num_layers} layers, not {keep}")
    if num_layers % keep == 0:
        kept = skip_kept_layers(num_layers, num_layers // keep)
        if len(kept) == keep:
            return kept
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def prune_kept_layers(block_influence: list[float], keep: int) -> list[int]:
    """The `keep` layers of highest block influence, in order (ShortGPT)."""
    n = len(block_influence)
    if not 1 <= keep <= n:
        raise CqilError(f"cannot keep {keep} of {n} layers")
    ranked = sorted(range(n), key=lambda i: (block_influence[i], i))
    removed = set(ranked[: n - keep])
    return [i for i in range(n) if i not in removed]


def remove_layers(model, kept: list[int]) -> None:
    """Keep only layers `kept` of a transformers causal LM whose layers are model.model.layers
    (every family cqil converts), in place.

    Fixes what indexes layers: the config's layer count and layer_types (Gemma's alternation of
    sliding and global layers follows the kept layers), and each attention's layer_idx (the
    KV-cache slot).
    """
    layers = model.model.layers
    model.model.layers = nn.ModuleList([layers[i] for i in kept])
    for new_index, layer in enumerate(model.model.layers):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)


def neighbours_of_removed(num_layers: int, kept: list[int]) -> list[int]:
    """New indices of kept layers right before or after a removed run (where LoRA helps most)."""
    kept_set = set(kept)
    out = []
    for new_index, old in enumerate(kept):
        if (old - 1 >= 0 and old - 1 not in kept_set) or \
                (old + 1 < num_layers and old + 1 not in kept_set):
            out.append(new_index)
    return out
