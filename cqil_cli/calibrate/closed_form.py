"""The local stage's closed-form start: ridge least squares on a block's down projections
(calibrate/reconstruct.py's module docstring; ReplaceMe, Shopkhoev et al. 2025, does the same for
a pruned block)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Block, cache_energy
from .options import LocalOptions

MAX_CLOSED_FORM_FEATURES = 8192  # P·I above this: the Gram matrix would be too large to solve


@torch.no_grad()
def closed_form_start(block: Block, x: torch.Tensor, y: torch.Tensor,
                       options: LocalOptions) -> tuple[float, float | None, str | None]:
    """(the block's error on the cache before the stage, its error after this start or None
    when there was none, what the start did).

    The block's output s is linear in each layer's down projection W_j [d, I]: s changes by
    γ_j ⊙ ΔW_j u_j (γ_j = 1 for a single layer) where u_j [.., I] is that projection's input.
    Stacking U = [u_1 … u_P] [N, P·I] and R = y − s [N, d] over the N cached tokens, the ridge
    solution Δ' = (UᵀU + λI)⁻¹ UᵀR (λ = options.ridge / n × the mean diagonal of UᵀU for n
    windows: a pull towards the current weights of a fixed strength, against fitting the cache
    too closely) gives ΔW_j = Δ'_jᵀ / γ_j, and
    the new error ‖R − UΔ'‖² = ‖R‖² − 2 tr(Δ'ᵀUᵀR) + tr(Δ'ᵀUᵀUΔ') without another pass. (A
    block whose output is not linear in W_j is caught by reconstruct's check afterwards.)
    """
    b = options.cache_batch
    downs = [getattr(getattr(layer, "mlp", None), "down_proj", None) for layer in block.layers]
    usable = options.closed_form and all(type(d) is nn.Linear for d in downs) and \
        sum(d.in_features for d in downs) <= MAX_CLOSED_FORM_FEATURES
    inputs: dict[int, torch.Tensor] = {}
    hooks = [d.register_forward_hook(lambda _m, args, _out, j=j: inputs.__setitem__(j, args[0]))
             for j, d in enumerate(downs)] if usable else []
    # Memory (the stage's peak on a 1-2 layer block): UᵀU in float64 [P·I, P·I], filled block
    # by block [I_j, I_k] from each batch's u_j (never the concatenated U [b·T, P·I], nor a
    # float64 copy of a product), and factored in place.
    sizes = [d.in_features for d in downs] if usable else []
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    gram = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64, device=x.device)
    cross = torch.zeros(sum(sizes), x.shape[-1], dtype=torch.float64, device=x.device)
    error = 0.0
    try:
        for xb, yb in zip(x.split(b), y.split(b), strict=True):
            residual = (yb - block.student(xb).float()).reshape(-1, yb.shape[-1])  # [b·T, d]
            error += float(residual.pow(2).sum())
            u = [inputs[j].reshape(-1, size).float() for j, size in enumerate(sizes)]  # [b·T, I_j]
            for j, (uj, oj) in enumerate(zip(u, offsets, strict=True)):
                cross[oj:oj + sizes[j]] += uj.T @ residual
                for k in range(j, len(u)):  # the upper blocks; the lower are their transposes
                    gram[oj:oj + sizes[j], offsets[k]:offsets[k] + sizes[k]] += uj.T @ u[k]
            del u
            inputs.clear()
    finally:
        for hook in hooks:
            hook.remove()
    energy = cache_energy(x, y)
    before = error / energy
    if not usable:
        return before, None, None
    for j in range(len(sizes)):
        for k in range(j + 1, len(sizes)):
            gram[offsets[k]:offsets[k] + sizes[k], offsets[j]:offsets[j] + sizes[j]] = \
                gram[offsets[j]:offsets[j] + sizes[j], offsets[k]:offsets[k] + sizes[k]].T
    ridge = float(options.ridge / x.shape[0] * gram.diagonal().mean().clamp_min(1e-30))
    gram.diagonal().add_(ridge)  # symmetric positive definite: Cholesky, in place
    factor, failed = torch.linalg.cholesky_ex(
        gram, out=(gram, torch.empty((), dtype=torch.int32, device=gram.device)))
    if failed:
        return before, None, "skipped (the Gram matrix is not positive definite)"
    solution = torch.cholesky_solve(cross, factor)  # Δ' [P·I, d]
    del factor, gram
    # ‖R − UΔ'‖² = ‖R‖² − 2 tr(Δ'ᵀUᵀR) + tr(Δ'ᵀUᵀUΔ'), and (UᵀU + λI)Δ' = UᵀR makes the last
    # term tr(Δ'ᵀUᵀR) − λ‖Δ'‖²: no need for UᵀU after the factorisation.
    predicted = (error - float((solution * cross).sum())
                 - ridge * float(solution.pow(2).sum())) / energy
    offset = 0
    for layer, down in zip(block.layers, downs, strict=True):
        delta = solution[offset:offset + down.in_features].T  # [d, I]
        offset += down.in_features
        gamma = getattr(layer, "cqil_gamma", None)
        if gamma is not None:
            delta = delta / gamma.double()[:, None]
        down.weight += delta.to(down.weight.dtype)
    return before, predicted, f"least squares (error {before:.4g} -> {predicted:.4g})"
