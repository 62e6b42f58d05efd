"""The precision tuning computes in: "bf16" (autocast) where the device has bf16 units, "fp32"
elsewhere, and what "fp32" means for a model stored in bf16 or fp16.

On a CPU without bf16 units (no AVX-512 BF16 / AMX), torch's bf16 matmuls take a generic
path whose speed depends on the operands' layout: a linear layer's forward (x Wᵀ, W [out,
in] contiguous) runs about 5x slower than in fp32, and its backward (g W and gᵀ x, the
untransposed layouts) 30-150x slower: one training step of a 1B model did not finish in 20
minutes. So under "fp32" every linear layer with reduced-precision weights computes in fp32
(fp32_linears): its input and weight are cast per call, the output and the gradients cast back,
and nothing is kept but what the layer kept already (no fp32 copy of the model: at most 64 MB
of one weight in fp32 at a time).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..core.errors import CqilError

REDUCED = (torch.bfloat16, torch.float16)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where the device computes bf16 natively (CUDA with bf16 support, a CPU
    with AVX-512 BF16 or AMX), else "fp32"; "fp32" and "bf16" are kept."""
    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise CqilError(f"unknown tuning precision '{precision}' (auto, bf16 or fp32)")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


CHUNK_ELEMENTS = 1 << 24  # weight elements upcast at a time: 64 MB in fp32 (a 1B model's MLP
# matrix is one chunk; its 128k-row head, 1 GB in fp32, sixteen)


class _LinearInFp32(torch.autograd.Function):
    """F.linear(x, w, b) computed in fp32 for x, w (and b) of one reduced dtype; the output and
    the gradients in that dtype. Saves x and w as F.linear would (no fp32 copies kept), and
    upcasts w a block of CHUNK_ELEMENTS at a time (output rows), so a large head never exists
    whole in fp32."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x32 = x.float()  # [..., in]
        out = x.new_empty((*x.shape[:-1], weight.shape[0]))  # [..., out], x's dtype
        for rows in _row_blocks(weight):
            b = None if bias is None else bias[rows].float()
            out[..., rows] = F.linear(x32, weight[rows].float(), b).to(x.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.float().reshape(-1, grad.shape[-1])  # [N, out]
        x32 = x.float().reshape(-1, x.shape[-1])  # [N, in]
        grad_x32 = torch.zeros_like(x32) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for rows in _row_blocks(weight):
            if grad_x32 is not None:
                grad_x32 += g[:, rows] @ weight[rows].float()
            if grad_w is not None:
                grad_w[rows] = (g[:, rows].T @ x32).to(weight.dtype)
        grad_x = None if grad_x32 is None else grad_x32.reshape(x.shape).to(x.dtype)
        grad_b = g.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _row_blocks(weight: torch.Tensor) -> list[slice]:
    """Slices of a weight's output rows, each at most CHUNK_ELEMENTS elements (one row at least)."""
    step = max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))
    return [slice(r, min(r + step, weight.shape[0])) for r in range(0, weight.shape[0], step)]


class _LinearsInFp32(TorchFunctionMode):
    """While active, F.linear of reduced-precision CPU tensors goes through _LinearInFp32."""

    active = 0  # how many are entered (checkpointed recomputation asks: same_linears)

    def __enter__(self):
        _LinearsInFp32.active += 1
        return super().__enter__()

    def __exit__(self, *exc):
        _LinearsInFp32.active -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if weight.dtype in REDUCED and x.dtype == weight.dtype and x.device.type == "cpu" \
                    and (bias is None or bias.dtype == weight.dtype):
                return _LinearInFp32.apply(x, weight, bias)
        return func(*args, **kwargs)


@contextmanager
def fp32_linears(precision: str, model: torch.nn.Module):
    """Where a tuning stage runs at precision "fp32" a model with reduced-precision weights on
    the CPU: its linear layers compute in fp32 while this is active. Enter it around forward
    AND backward (a checkpointed forward is recomputed in the backward). "bf16" is autocast,
    which the stages apply around their forward passes themselves."""
    param = next(model.parameters(), None)
    active = precision == "fp32" and param is not None and param.device.type == "cpu" and \
        any(p.dtype in REDUCED for p in model.parameters())
    with _LinearsInFp32() if active else nullcontext():
        yield


def same_linears():
    """For torch.utils.checkpoint's context_fn: (forward, recomputation) contexts that make the
    recomputation in the backward compute as the forward did (the autograd engine does not
    carry this module's mode into it; a different computation there is an error)."""
    if _LinearsInFp32.active:
        return nullcontext(), _LinearsInFp32()
    return nullcontext(), nullcontext()


__all__ = ["fp32_linears", "resolve_precision", "same_linears"]
