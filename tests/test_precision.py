"""Tuning precision (calibrate/precision.py): "fp32" computes a bf16 model's linear layers in
fp32 (forward and backward), against the plain formulas on random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from cqil_cli.calibrate.options import TuneOptions
from cqil_cli.calibrate.precision import fp32_linears
from cqil_cli.calibrate.tuning import tune_groups
from cqil_cli.runtime.checkpoint import build_cqil_model


@pytest.mark.parametrize("bias", [False, True])
def test_linear_in_fp32_matches_the_fp32_formulas(bias):
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(24, 40, bias=bias).to(torch.bfloat16)
    x = torch.randn(3, 5, 24, generator=g).to(torch.bfloat16).requires_grad_(True)
    upstream = torch.randn(3, 5, 40, generator=g).to(torch.bfloat16)
    with fp32_linears("fp32", layer):
        y = layer(x)
        y.backward(upstream)
    w, b = layer.weight, layer.bias
    # the reference: the same products in fp32, each result rounded to bf16 once
    ref = F.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    g32 = upstream.float()
    assert torch.equal(x.grad, (g32 @ w.float()).to(torch.bfloat16))
    assert torch.equal(w.grad, (g32.reshape(-1, 40).T @ x.detach().float().reshape(-1, 24))
                       .to(torch.bfloat16))
    if bias:
        assert torch.equal(b.grad, g32.reshape(-1, 40).sum(0).to(torch.bfloat16))


def test_a_weight_upcast_in_row_blocks_gives_the_same_results(monkeypatch):
    """A weight larger than CHUNK_ELEMENTS (a big head) is upcast a block of rows at a time:
    the same output and weight gradient, the input gradient summed over the blocks (fp32
    rounding apart: within one bf16 ulp)."""
    import cqil_cli.calibrate.precision as precision

    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(24, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(7, 24, generator=g).to(torch.bfloat16)
    upstream = torch.randn(7, 40, generator=g).to(torch.bfloat16)
    results = []
    for chunk in (1 << 24, 24 * 6):  # one block; seven blocks of 6 rows (the last of 4)
        monkeypatch.setattr(precision, "CHUNK_ELEMENTS", chunk)
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with fp32_linears("fp32", layer):
            y = layer(xi)
            y.backward(upstream)
        results.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
    (y1, gx1, gw1, gb1), (y7, gx7, gw7, gb7) = results
    assert torch.equal(y1, y7) and torch.equal(gw1, gw7) and torch.equal(gb1, gb7)
    assert torch.allclose(gx1.float(), gx7.float(), rtol=8e-3, atol=1e-6)


def test_fp32_linears_is_inactive_for_fp32_models_and_bf16_precision():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with fp32_linears("fp32", layer):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    bf = torch.nn.Linear(8, 8).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with fp32_linears("bf16", bf):  # autocast's business, not this mode's
        assert torch.equal(bf(xb), F.linear(xb, bf.weight, bf.bias))


def test_tuning_a_bf16_model_in_fp32_compute_is_close_to_the_fp32_model():
    """tune_groups on a bf16 copy (precision fp32: linears in fp32) follows the fp32 model's
    first losses within bf16 tolerance, and trains (gradients reach LoRA and bypass)."""
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_cqil_model(tiny_model("llama-gqa").to(dtype), "1-2,3-4", 1)
        ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
        result = tune_groups(model, ids, TuneOptions(steps=2, minutes=None, batch_size=2,
                                                     lora_rank=4, precision="fp32", seed=0))
        losses[dtype] = result.losses
        assert result.precision == "fp32" and result.steps == 2
    first32, first16 = losses[torch.float32][0], losses[torch.bfloat16][0]
    assert first16 == pytest.approx(first32, rel=5e-2, abs=1e-3)


def test_the_precision_benchmark_runs():
    from cqil_cli.benchmarks.precision import measure

    rows = measure(tokens=4, repeats=1, shapes={"tiny": (16, 32)})
    assert rows[0]["matrix"] == "tiny" and rows[0]["bf16_s"] > 0 and rows[0]["fp32_s"] > 0
