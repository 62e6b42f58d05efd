"""Quantization with the quantizer in the loop: local reconstruction of every step under
straight-through rounding (`cqil convert --weights int4 --weight-method local`, docs/convert.md
"Weights").

    quantize_local(model, scheme, calib_ids, minutes, windows)   every linear of the decoder
                                                                 layers trained, then stored as
                                                                 round to nearest; a record

Every step of a CqilForCausalLM (a group, or a layer of its own) is a block of
calibrate/reconstruct.py:
  original  the step with its dense weights: what the quantized step should reproduce;
  student   the same step with each linear weight W [out, in] replaced in the forward by
            Q(W) = dequantize(round to nearest(W)) (runtime/quant_cqil.py's scales and codes),
            and in the backward by W itself (W + (Q(W) − W).detach(): straight-through rounding),
            so AdamW moves the dense W until its rounding reproduces the original step's output
            on the cached calibration windows (the scales follow W: they are round to nearest's).
The blocks train in order, each fed the output of the quantized steps before it; each keeps the
best of its states by its error on the cache (reconstruct: never worse than round to nearest
there). The codes stored are then round to nearest of the trained weights: bit for bit the Q(W)
the last forward computed (what is trained is what is stored). Norm gains, biases and the cqil
bypass weights β, γ train with the block and stay dense. The head is rounded to nearest.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..runtime.quant_cqil import WeightScheme, dequantize_codes, round_to_nearest
from .blocks import Block, Blocks
from .options import LocalOptions
from .quantize import quantize_model
from .reconstruct import reconstruct

LOCAL_LR = 5e-4  # AdamW's step on the dense weights. Measured on the default model's 24-step
# folder, int4, 16 windows, 1.5 min: 1e-4 +1.93 % held-out (few steps on 64 windows), 5e-4 +0.77 %,
# 1e-3 +0.97 %, 2e-3 no block improved (each kept its round to nearest) (docs/quality.md)
LOCAL_BATCH = 4  # windows per optimizer step


class QuantizerSwitch:
    """Shared by every RoundTrip of a model: off() runs the dense weights (the original)."""

    def __init__(self):
        self.on = True

    @contextmanager
    def off(self):
        self.on = False
        try:
            yield
        finally:
            self.on = True


class RoundTrip(nn.Module):
    """The parametrization W -> W + (Q(W) − W).detach() (module docstring), Q as stored."""

    def __init__(self, fmt: str, group_size: int | None, switch: QuantizerSwitch):
        super().__init__()
        self.fmt, self.group_size, self.switch = fmt, group_size, switch

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.switch.on:
            return w
        return w + (rounded(w.detach(), self.fmt, self.group_size) - w).detach()


@torch.no_grad()
def rounded(w: torch.Tensor, fmt: str, group_size: int | None) -> torch.Tensor:
    """Q(w) for w [out, in]: round to nearest in fmt, dequantized to w's dtype (exactly what
    QuantLinear.dequantize gives for quantize_weight's tensors)."""
    q, s, z = round_to_nearest(w, fmt, group_size)
    return dequantize_codes(q, 8 if fmt == "int8" else 4, s, z, group_size, w.dtype)


def _layer_linears(model) -> list[nn.Linear]:
    return [m for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]


def step_blocks(model, example_ids: torch.Tensor, switch: QuantizerSwitch) -> Blocks:
    """Every step of a CqilForCausalLM as a block (module docstring); example_ids [b, T]: the
    windows' length (every batch shares one StepContext: positions 0..T-1, every layer)."""
    inner = model.model
    steps = model.config.groups
    device = next(model.parameters()).device
    _, context = inner.prepare_steps(example_ids[:1].to(device))

    def student(s: int):
        return lambda x: inner.run_steps(x, context, steps=range(s, s + 1))

    def original(s: int):
        def run(x):
            with switch.off():
                return inner.run_steps(x, context, steps=range(s, s + 1))
        return run

    def first_input(ids):
        return inner.prepare_steps(ids)[0]

    blocks = [Block(f"layers {g[0]}-{g[-1]}" if len(g) > 1 else f"layer {g[0]}", inner.step_layers(s),
                    student=student(s), original=original(s), after=lambda x: x,
                    passes=2 * len(g)) for s, g in enumerate(steps)]
    return Blocks(model, first_input, blocks, prefix=0)


def quantize_local(model, scheme: WeightScheme, calib_ids: torch.Tensor, minutes: float,
                   windows: int, on_step=None, on_block=None) -> dict:
    """Train model's decoder-layer weights with the quantizer in the loop (module docstring) for
    about `minutes` on the first `windows` of calib_ids [n, T], then quantize them in place
    (quantize_model's round to nearest). Returns quantize_model's record plus the stage's:
    {local: {steps, seconds, windows, nmse_start, nmse_end}} (the mean over the steps of their
    error on the cache, relative to their delta's energy, before and after)."""
    started = time.perf_counter()
    switch = QuantizerSwitch()
    linears = _layer_linears(model)
    engine = getattr(model.config, "engine", None)
    model.set_engine("reference")  # the modules' forward: where the parametrization applies
    for m in linears:
        parametrize.register_parametrization(m, "weight", RoundTrip(scheme.format, scheme.group_size, switch))
    options = LocalOptions(steps=None, minutes=minutes, params="full", loss="nmse", closed_form=False,
                           lr_full=LOCAL_LR, batch_size=LOCAL_BATCH, samples=windows, precision="fp32")
    try:
        result = reconstruct(step_blocks(model, calib_ids, switch), calib_ids, options,
                             on_step=on_step, on_block=on_block)
    finally:
        for m in linears:  # the trained dense weights stay; Q of them is what gets stored
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        if engine is not None:
            model.set_engine(engine)
    if result.saved is not None:
        result.saved.close()  # the stage is kept: its undo is not needed
        result.saved = None
    record = quantize_model(model, dataclasses.replace(scheme, method="rtn"))
    model.config.weights = {**scheme.to_json(), "method": "local"}  # how the codes were chosen
    record["local"] = {"steps": result.steps, "seconds": round(result.seconds, 1), "windows": result.samples,
                       "nmse_start": _rounded(result.loss_start), "nmse_end": _rounded(result.loss_end)}
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


__all__ = ["QuantizerSwitch", "RoundTrip", "quantize_local", "rounded", "step_blocks"]
