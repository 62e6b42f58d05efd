"""Weight-only quantization of a model's linear layers: round to nearest, or GPTQ on the
calibration windows (docs/convert.md, "Weights").

    quantize_model(model, scheme, calib_ids)   every linear of the decoder layers (and the head,
                                               scheme.head) becomes a runtime/quant_cqil.py
                                               QuantLinear, in place; returns a record

GPTQ (Frantar et al., 2023) chooses each column's codes in turn and spreads its rounding error
over the columns not yet quantized, weighted by the inverse Hessian H^-1 of the layer's
reconstruction error, H = X^T X over the calibration tokens X [tokens, in] the layer sees. The
Hessians are collected in one pass of the model as it is (the reference engine: its modules'
forward hooks see every linear's input, groups included), not layer by layer. int4 groups are
chosen from the weights as updated so far (the group's scales are fixed when its first column is
reached); int8 keeps round-to-nearest's per-row scales and lets GPTQ pick the codes.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..runtime.quant_cqil import (
    WeightScheme,
    codes_for,
    dequantize_codes,
    int4_params,
    int8_scales,
    pack_int4,
    swap_linears,
)

METHODS = ("gptq", "rtn")
GPTQ_BLOCK = 128  # columns updated together (lazy batch updates); a multiple of every group size used
GPTQ_DAMP = 0.01  # H += 1% of its mean diagonal: keeps H^-1 stable for rarely-active inputs


def linear_targets(model, scheme: WeightScheme) -> dict[str, nn.Linear]:
    """qualified name -> the nn.Linear modules swap_linears replaces (same names)."""
    core = model.model if hasattr(model, "model") else model
    found = {f"model.layers.{i}.{name}": m for i, layer in enumerate(core.layers)
             for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    if scheme.head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        found["lm_head"] = model.lm_head
    return found


@torch.no_grad()
def collect_hessians(model, targets: dict[str, nn.Linear], calib_ids: torch.Tensor,
                     batch: int = 4, on_batch=None) -> dict[str, torch.Tensor]:
    """H = sum of x^T x [in, in] (fp32) over every calibration token each target layer sees.

    Layers reading the same input (q, k and v; gate and up) share one matrix: the hook keys it by
    the input tensor, so a 1B model holds about three per layer instead of seven."""
    sums: dict[str, torch.Tensor] = {}
    # id(input) -> (the input, the layer that recorded it); holding the input keeps its memory
    # from being reused by a later activation within the batch (ids stay unique)
    shared: dict[int, tuple[torch.Tensor, str]] = {}
    hooks = []

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            seen = shared.get(id(x))
            if seen is not None and seen[0] is x:  # a sibling layer's very input: one matrix
                sums[name] = sums[seen[1]]
                return
            shared[id(x)] = (x, name)
            x = x.detach().reshape(-1, x.shape[-1]).float()
            if name in sums:
                sums[name].addmm_(x.t(), x)
            else:
                sums[name] = x.t() @ x
        return record

    for name, module in targets.items():
        hooks.append(module.register_forward_hook(hook(name)))
    engine = getattr(model.config, "engine", None)
    if hasattr(model, "set_engine"):
        model.set_engine("reference")  # the fused engine bypasses the modules' forward
    try:
        for start in range(0, calib_ids.shape[0], batch):
            shared.clear()
            model(calib_ids[start: start + batch].to(next(model.parameters()).device))
            if on_batch is not None:
                on_batch()
    finally:
        for h in hooks:
            h.remove()
        if hasattr(model, "set_engine") and engine is not None:
            model.set_engine(engine)
    return sums


def gptq_weight(w: torch.Tensor, hessian: torch.Tensor, fmt: str, group_size: int | None,
                block: int = GPTQ_BLOCK, damp: float = GPTQ_DAMP) -> dict:
    """GPTQ's codes for w [out, in] given H [in, in] -> the stored tensors (quantize_weight's
    form: qweight, scales[, zeros])."""
    W = w.detach().float().clone()
    H = hessian.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError:  # numerically singular even after damping: round to nearest
        from ..runtime.quant_cqil import quantize_weight
        return quantize_weight(w, fmt, group_size)
    bits = 8 if fmt == "int8" else 4
    if bits == 4:
        block = max(group_size, block // group_size * group_size)  # groups never straddle blocks
        scales = torch.empty(W.shape[0], cols // group_size)
        zeros = torch.empty_like(scales)
    else:
        scales, zeros = int8_scales(W), None
    codes = torch.empty(W.shape, dtype=torch.int8 if bits == 8 else torch.uint8)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if bits == 4 and col % group_size == 0:  # the group's range as updated so far
                g = col // group_size
                s, z = int4_params(W1[:, i: i + group_size], group_size)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            if bits == 4:
                g = col // group_size
                s_col, z_col = scales[:, g: g + 1], zeros[:, g: g + 1]
                q = codes_for(W1[:, i: i + 1], 4, s_col, z_col, 1)
                deq = dequantize_codes(q, 4, s_col, z_col, 1)[:, 0]
            else:
                q = codes_for(W1[:, i: i + 1], 8, scales, None, None)
                deq = dequantize_codes(q, 8, scales, None, None)[:, 0]
            codes[:, col] = q[:, 0]
            err = (W1[:, i] - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if bits == 8:
        return {"qweight": codes, "scales": scales}
    return {"qweight": pack_int4(codes), "scales": scales, "zeros": zeros}


def quantize_model(model, scheme: WeightScheme, calib_ids: torch.Tensor | None = None,
                   on_layer=None, on_batch=None) -> dict:
    """Quantize model's linears in place (scheme.method: gptq needs calib_ids) and mark its
    config (weights; an untied head when the head is quantized: the embedding stays dense).
    Returns {seconds, layers, bytes_before, bytes_after}."""
    started = time.perf_counter()
    targets = linear_targets(model, scheme)
    dense_bytes = sum(m.weight.numel() * m.weight.element_size() for m in targets.values())
    stored = {}
    if scheme.method == "gptq":
        if calib_ids is None:
            raise ValueError("GPTQ needs calibration windows")
        hessians = collect_hessians(model, targets, calib_ids, on_batch=on_batch)
        for name, module in targets.items():
            fmt = scheme.head if name == "lm_head" else scheme.format
            group = scheme.group_size if fmt == "int4" else None
            stored[name] = gptq_weight(module.weight, hessians.pop(name), fmt, group)
            if on_layer is not None:
                on_layer(name)
    swap_linears(model, scheme, stored)
    model.config.weights = scheme.to_json()
    if scheme.head:
        model.config.tie_word_embeddings = False
    if hasattr(model, "cqil_refresh_fused"):
        model.cqil_refresh_fused()
    from ..runtime.quant_cqil import quantized_linears
    after = sum(m.stored_bytes() for m in quantized_linears(model))
    return {"seconds": round(time.perf_counter() - started, 1), "layers": len(targets),
            "linear_bytes_before": int(dense_bytes), "linear_bytes_after": int(after)}


__all__ = ["METHODS", "collect_hessians", "gptq_weight", "linear_targets", "quantize_model"]
