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
    int4_params,
    int8_scales,
    pack_int4,
    swap_linears,
)

METHODS = ("gptq", "local", "rtn")  # local: calibrate/quantize_local.py
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
    the input tensor, so a model holds four per layer (q/k/v, o, gate/up, down) instead of seven."""
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
    form: qweight, scales[, zeros]).

    Works on the transpose Wt [in, out], so that the column being quantized and the rows of the
    rank-1 updates are contiguous; the column loop (hundreds of small ops per layer) runs on
    one thread: at this size a second thread's synchronisation costs more than the op
    (measured 25 ms against 15 µs per op on a busy 2-core machine); the block updates keep
    every thread."""
    Wt = w.detach().float().t().contiguous()  # [in, out]
    H = hessian.clone()
    cols = Wt.shape[0]
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    Wt[dead, :] = 0.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError:  # numerically singular even after damping: round to nearest
        from ..runtime.quant_cqil import quantize_weight
        return quantize_weight(w, fmt, group_size)
    bits = 8 if fmt == "int8" else 4
    out = Wt.shape[1]
    if bits == 4:
        block = max(group_size, block // group_size * group_size)  # groups never straddle blocks
        scales_t = torch.empty(cols // group_size, out)  # [groups, out], transposed at the end
        zeros_t = torch.empty_like(scales_t)
    else:
        scales = int8_scales(w.detach().float())  # [out, 1]
        s_row = scales[:, 0]
    codes_t = torch.empty(cols, out, dtype=torch.int8 if bits == 8 else torch.uint8)
    threads = torch.get_num_threads()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = Wt[i1:i2].clone()  # [b, out]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        torch.set_num_threads(1)
        try:
            for i in range(i2 - i1):
                col = i1 + i
                if bits == 4:
                    g = col // group_size
                    if col % group_size == 0:  # the group's range as updated so far
                        s, z = int4_params(W1[i: i + group_size].t(), group_size)
                        scales_t[g], zeros_t[g] = s[:, 0], z[:, 0]
                    s_col, z_col = scales_t[g], zeros_t[g]
                    q = torch.clamp(torch.round((W1[i] - z_col) / s_col) + 8, 0, 15)
                    deq = (q - 8.0) * s_col + z_col  # dequantize_codes' arithmetic, one column
                else:
                    q = torch.clamp(torch.round(W1[i] / s_row), -127, 127)
                    deq = q * s_row
                codes_t[col] = q.to(codes_t.dtype)
                err = (W1[i] - deq) / Hinv1[i, i]
                W1[i:] -= Hinv1[i, i:, None] * err[None, :]
                Err1[i] = err
        finally:
            torch.set_num_threads(threads)
        Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err1
    codes = codes_t.t().contiguous()
    if bits == 8:
        return {"qweight": codes, "scales": scales}
    return {"qweight": pack_int4(codes), "scales": scales_t.t().contiguous(),
            "zeros": zeros_t.t().contiguous()}


def quantize_model(model, scheme: WeightScheme, calib_ids: torch.Tensor | None = None,
                   on_layer=None, on_batch=None) -> dict:
    """Quantize model's linears in place (scheme.method: gptq needs calib_ids) and mark its
    config (weights; an untied head when the head is quantized: the embedding stays dense).
    Returns {seconds, layers, linear_bytes_before (weights), linear_bytes_after (codes, scales,
    zeros and biases)}."""
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
