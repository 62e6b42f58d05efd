"""Weight-only int8 / int4 linears (runtime/quant_cqil.py): the format, the engines, save/load.

Tolerances: the reference engine dequantizes in fp32, so it equals an fp32 model holding the
dequantized weights within 1e-5; the CPU kernels round activations to bf16 (fp32 accumulation),
so fast paths equal the reference within 2e-2 relative (bf16's ~1e-2 per rounding, twice).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tiny_models
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB_SIZE as V
from tiny_models import randomise_bypass, rel, tiny_model

from cqil_cli.runtime.checkpoint import build_cqil_model, load_converted, save_converted
from cqil_cli.runtime.fastgen import FastGenerator
from cqil_cli.runtime.quant_cqil import (
    QuantKernel,
    QuantLinear,
    WeightScheme,
    dequantize_codes,
    pack_int4,
    quantize_weight,
    quantized_linears,
    swap_linears,
    unpack_int4,
)

INT8 = WeightScheme("int8")
INT4 = WeightScheme("int4", group_size=32)
SCHEMES = {"int8": INT8, "int4": INT4}


def quantized(kind: str, groups: str = "none", distance: int = 0, scheme=INT4, seed: int = 0):
    model = build_cqil_model(tiny_model(kind, seed, stop_at_eos=False), groups, distance)
    if groups != "none":
        randomise_bypass(model, low=0.6, high=1.2)
    swap_linears(model, scheme)
    model.config.weights = scheme.to_json()
    model.config.tie_word_embeddings = False  # the head is quantized on its own
    return model


# --------------------------------------------------------------------------- the format


@pytest.mark.parametrize("shape", [(16, 64), (48, 96), (7, 32)])
def test_int4_pack_round_trip(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (shape[0], shape[1] // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32), ("int4", 16)])
def test_round_trip_within_the_schemes_bound(fmt, group):
    """Every dequantized weight lies within half a step of the original (plus the bf16
    rounding of the zero point, int4), and the codes stay in range."""
    torch.manual_seed(0)
    w = torch.randn(40, 96) * torch.rand(40, 1) * 3
    w[3] = 0.0  # an all-zero row
    stored = quantize_weight(w, fmt, group)
    bits = 8 if fmt == "int8" else 4
    codes = stored["qweight"] if bits == 8 else unpack_int4(stored["qweight"])
    deq = dequantize_codes(codes, bits, stored["scales"], stored.get("zeros"), group)
    if bits == 8:
        assert codes.abs().max() <= 127
        bound = stored["scales"] / 2 * (1 + 1e-6)  # [out, 1]
    else:
        assert codes.max() <= 15
        s = stored["scales"].repeat_interleave(group, 1)
        z = stored["zeros"].repeat_interleave(group, 1)
        bound = s / 2 + z.abs() * 2 ** -8 + 1e-7
    assert bool(((deq - w).abs() <= bound).all())
    assert torch.equal(stored["scales"], stored["scales"].to(torch.bfloat16).float())  # bf16 values
    assert float(deq[3].abs().max()) == 0.0


@pytest.mark.parametrize("fmt,group,n_out,n_in", [
    ("int8", None, 48, 64), ("int8", None, 20, 40),  # 40: the kernel refuses, reference runs
    ("int4", 32, 48, 96), ("int4", 16, 48, 64), ("int4", 32, 20, 64)])  # 16, 20: reference
def test_kernel_equals_the_reference(fmt, group, n_out, n_in):
    torch.manual_seed(1)
    lin = nn.Linear(n_in, n_out, bias=True)
    q = QuantLinear.from_linear(lin, fmt, group)
    for n in (1, 3, 17):
        x = torch.randn(n, n_in)
        want = q(x)
        assert rel(want, x @ q.dequantize().t() + lin.bias) < 1e-6
        assert rel(q.kernel()(x), want) < 2e-2
        assert rel(q.kernel()(x, add=want), 2 * want) < 2e-2


def test_stacked_kernel_equals_each_layer():
    torch.manual_seed(2)
    layers = [QuantLinear.from_linear(nn.Linear(64, n), "int4", 32) for n in (32, 16, 16)]
    x = torch.randn(5, 64)
    got = QuantKernel(layers)(x)
    assert rel(got, torch.cat([ly(x) for ly in layers], -1)) < 2e-2


# --------------------------------------------------------------------------- the engines


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("kind", tiny_models.FAMILIES)
def test_fused_engine_equals_the_reference_on_quantized_weights(kind, fmt):
    """Every family, a group of 2 with D = 1: the fused engine's kernels equal the reference
    engine (dequantize, F.linear) on the same quantized weights; the reference equals a dense
    model holding the dequantized weights."""
    model = quantized(kind, "1-2", 1, SCHEMES[fmt])
    ids = torch.randint(3, V, (2, 9))
    with torch.no_grad():
        for rows in (ids[:, :1], ids):  # the decode shape (one row per sequence), then a prompt
            model.set_engine("fused")
            fused = model(rows).logits
            model.set_engine("reference")
            ref = model(rows).logits  # (the last: the full prompt's, compared with dense below)
            assert rel(fused, ref) < 5e-2  # bf16 activations at every linear of 5-7 layers
    dense = build_cqil_model(tiny_model(kind, 0, stop_at_eos=False), "1-2", 1)
    dense.load_state_dict(model.state_dict(), strict=False)  # gamma, beta, norms
    named = dict(dense.named_modules())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                named[name].weight = nn.Parameter(m.dequantize())  # unties a tied head
        dense.set_engine("reference")
        assert rel(dense(ids).logits, ref) < 1e-5


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("kind,groups,distance", [("llama-gqa", "1-2,3-4", 1), ("phi3-partial", "0-2", 2)])
def test_cached_equals_uncached_and_fastgen_equals_generate(kind, groups, distance, fmt):
    model = quantized(kind, groups, distance, SCHEMES[fmt])
    ids, mask = tiny_models.padded_batch(V, lengths=(10, 6))
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                  use_cache=False)
    assert torch.equal(cached, uncached)
    fast = FastGenerator(model).generate(ids, mask, max_new_tokens=8)
    assert torch.equal(fast.tokens, cached[:, ids.shape[1]:])


# --------------------------------------------------------------------------- save and load


def test_save_load_and_remote_code_without_cqil(tmp_path):
    model = quantized("llama-gqa", "1-2", 1, INT4)
    out = save_converted(model, tiny_models.offline_tokenizer(), tmp_path / "q4")
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.uint8
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    assert tensors["lm_head.qweight"].dtype == torch.int8
    assert json.loads((out / "config.json").read_text())["weights"]["format"] == "int4"
    ids = torch.randint(3, V, (1, 8))
    with torch.no_grad():
        want = model(ids).logits
        back = load_converted(out)
        assert len(quantized_linears(back)) == len(quantized_linears(model))
        assert rel(back(ids).logits, want) < 1e-6
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): print(repr(m(ids).logits[0, -1, :4].tolist()))\n"
        "assert not any(k.startswith('cqil_cli') for k in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.tensor(eval(run.stdout.strip().splitlines()[-1]))
    assert rel(got, want[0, -1, :4]) < 1e-5


@pytest.mark.parametrize("damage", ["nan", "shape"])
def test_damaged_scales_are_refused_in_one_line(tmp_path, damage):
    model = quantized("llama-gqa", "none", 0, INT8)
    out = save_converted(model, tiny_models.offline_tokenizer(), tmp_path / "q8")
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.scales"
    tensors[name] = tensors[name].clone()
    if damage == "nan":
        tensors[name][0] = float("nan")
    else:
        tensors[name] = tensors[name][:-1]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    run = subprocess.run([sys.executable, "-m", "cqil_cli", "generate", str(out), "--prompt", "ab",
                          "--new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "down_proj.scales" in lines[0]


def test_latency_model_times_the_variants_in_the_weights_format():
    """convert --weights: the search's latency model times quantized variants (a budget is a
    fraction of the quantized original's latency) and leaves the dense base as it was."""
    from cqil_cli.search.latency_model import measure_latency_model

    base = tiny_model("llama-gqa")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = measure_latency_model(base, 2, prompt_len=6, new_tokens=2, repeats=1, weights=INT4)
    assert model.weights == "int4" and model.to_json()["weights"] == "int4"
    assert all(v > 0 for v in model.step_ms.values()) and model.original_ms > 0
    assert not any(isinstance(m, QuantLinear) for m in base.modules())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32)])
def test_gptq_beats_round_to_nearest_on_its_calibration_inputs(fmt, group):
    """GPTQ chooses codes for the layer's output on the inputs H was built from: its output
    error ‖X (Ŵ − W)ᵀ‖ is below round to nearest's (inputs of uneven scale and correlated, as
    activations are); its codes stay in the format's range."""
    from cqil_cli.calibrate.quantize import gptq_weight

    torch.manual_seed(0)
    w = torch.randn(48, 128)
    x = torch.randn(512, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(512, 128) * torch.rand(128) * 4
    bits = 8 if fmt == "int8" else 4

    def out_error(stored):
        q = stored["qweight"] if bits == 8 else unpack_int4(stored["qweight"])
        deq = dequantize_codes(q, bits, stored["scales"], stored.get("zeros"), group)
        return ((x @ (deq - w).t()).norm() / (x @ w.t()).norm()).item()

    gptq = gptq_weight(w, x.t() @ x, fmt, group)
    rtn = quantize_weight(w, fmt, group)
    assert out_error(gptq) < 0.8 * out_error(rtn)
    assert gptq["scales"].shape == rtn["scales"].shape and gptq["qweight"].dtype == rtn["qweight"].dtype


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32)])
def test_round_trip_parametrization_is_what_gets_stored_and_passes_gradients_straight(fmt, group):
    """--weight-method local: the forward's Q(W) is bit for bit the weight the stored codes
    stand for (QuantLinear.dequantize), and the backward passes the rounding unchanged."""
    from cqil_cli.calibrate.quantize_local import QuantizerSwitch, RoundTrip

    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    switch = QuantizerSwitch()
    q = RoundTrip(fmt, group, switch)
    w = linear.weight.detach().clone().requires_grad_(True)
    stored = QuantLinear.from_linear(linear, fmt, group).dequantize(w.dtype)
    assert torch.equal(q(w).detach(), stored)
    c = torch.randn_like(w)
    (q(w) * c).sum().backward()
    assert torch.equal(w.grad, c)
    with switch.off():
        assert q(w) is w


def test_local_reconstruction_trains_what_it_stores_and_never_loses_on_its_cache():
    """quantize_local on a grouped tiny model: every linear of the layers ends quantized with
    method local, each step's error on the cache is at most round to nearest's, the stored codes
    are round to nearest of the trained weights (the fused engine runs them), and the trained
    model is closer to the dense one than round to nearest on the calibration windows."""
    import copy

    from cqil_cli.calibrate.quantize_local import quantize_local

    dense = build_cqil_model(tiny_model("llama-gqa", 0, stop_at_eos=False), "1-2", 1)
    randomise_bypass(dense, low=0.6, high=1.2)
    dense.eval()
    ids = torch.randint(0, V, (8, 12), generator=torch.Generator().manual_seed(0))
    rtn, local = copy.deepcopy(dense), copy.deepcopy(dense)
    from cqil_cli.calibrate.quantize import quantize_model

    quantize_model(rtn, INT4)
    record = quantize_local(local, INT4, ids, minutes=0.1, windows=8)
    assert local.config.weights["method"] == "local" and record["local"]["steps"] > 0
    assert record["local"]["nmse_end"] <= record["local"]["nmse_start"]
    assert len(quantized_linears(local)) == len(quantized_linears(rtn))
    assert not any(type(m) is nn.Linear for m in local.model.layers.modules())

    with torch.no_grad():
        ref = dense(ids).logits.float().log_softmax(-1)

        def kl(model):
            return torch.nn.functional.kl_div(model(ids).logits.float().log_softmax(-1), ref,
                                              log_target=True, reduction="batchmean").item()
        assert kl(local) < kl(rtn)
        local.set_engine("reference")
        want = local(ids).logits
        local.set_engine("fused")
        assert rel(local(ids).logits, want) < 2e-2  # the CPU kernels run in bf16
