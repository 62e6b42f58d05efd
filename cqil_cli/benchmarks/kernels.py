"""One-token (M = 1) matmul kernels on the CPU: cqil's int8/int4 path against dense and torchao.

    python -m cqil_cli.benchmarks.kernels [--layers N] [--repeats R] [--json FILE] [--no-compile]
        [--no-torchao] [--threads T]

A decode step's linear layers, called in sequence: per layer q/k/v stacked, o, gate/up stacked
and down (the fused engine's shapes), then the head; the shapes come from the default model's
config.json when it is in $CQIL_HOME (else SmolLM2-135M's constants). Weights are seeded random
(timings do not depend on the values); every variant quantizes the head in its own format.
  fp32, bf16         F.linear on dense weights
  ours-int8/int4     QuantLinear.from_linear(...).kernel(): aten _weight_int8pack_mm /
                     _weight_int4pack_mm_for_cpu (int4 group 32), bf16 activations
  ao-int8/int4       torchao, when importable (an optional benchmark input, never a cqil
                     dependency): quantize_ with Int8WeightOnlyConfig and the CPU int4 config
                     (group 32); eager and, unless --no-compile, under torch.compile
Runs are interleaved (one stack call of each variant per repeat, in a shuffled order, after a
warm-up); the median and the fastest call are reported, each also as a ratio to fp32's, and
GB/s is the weight bytes over the fastest call (on a shared CPU the least disturbed). Before
timing, each variant's outputs are checked against x times its own dequantized weights in fp32
(bf16 activations: 1e-2 relative; fp32: 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..inputs.assets import cqil_home
from ..inputs.models import DEFAULT_NAME
from ..runtime.quant_cqil import QuantLinear
from .runtime import cpu_name

GROUP = 32
DEFAULT_DIMS = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 30, "vocab_size": 49152}


def model_dims() -> tuple[dict, str]:
    """(dims, where they came from): the default model's config.json if present (never fetched)."""
    path = cqil_home() / "models" / DEFAULT_NAME / "config.json"
    if not path.exists():
        return dict(DEFAULT_DIMS), "SmolLM2-135M constants (default model not materialised)"
    config = json.loads(path.read_text())
    dims = {k: config.get(k, v) for k, v in DEFAULT_DIMS.items()}
    dims["head_dim"] = config.get("head_dim") or dims["hidden_size"] // dims["num_attention_heads"]
    return dims, str(path)


def stack_shapes(dims: dict, layers: int) -> list[tuple[str, int, int]]:
    """(name, out, in) of one decode step's matmuls in call order: `layers` layers, then the head."""
    h, i, d = dims["hidden_size"], dims["intermediate_size"], dims["head_dim"]
    qkv = (dims["num_attention_heads"] + 2 * dims["num_key_value_heads"]) * d
    layer = [("qkv", qkv, h), ("o", h, dims["num_attention_heads"] * d), ("gate_up", 2 * i, h), ("down", h, i)]
    return [s for _ in range(layers) for s in layer] + [("head", dims["vocab_size"], h)]


@dataclass
class Variant:
    name: str
    kernel: str  # what computes it
    step: Callable  # inputs {in_features: x} -> list of outputs
    refs: list  # fp32 dequantized weights, one per matmul
    weight_bytes: int
    act_dtype: torch.dtype = torch.bfloat16
    tol: float = 1e-2
    times: list = field(default_factory=list)
    max_err: float = float("nan")


def _nbytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):  # a tensor subclass (torchao): its inner tensors
        names, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    return t.numel() * t.element_size()


def _dense(name: str, weights: list, dtype: torch.dtype) -> Variant:
    ws = [w.to(dtype).contiguous() for w in weights]

    def step(xs):
        return [F.linear(xs[w.shape[1]], w) for w in ws]
    return Variant(name, f"F.linear {str(dtype).replace('torch.', '')}", step, [w.float() for w in ws],
                   sum(_nbytes(w) for w in ws), act_dtype=dtype, tol=1e-5 if dtype == torch.float32 else 1e-2)


def _ours(fmt: str, weights: list) -> Variant:
    layers = [QuantLinear.from_linear(_linear(w), fmt, GROUP if fmt == "int4" else None) for w in weights]
    kernels = [q.kernel() for q in layers]
    held = [(k.qweight, k.scales) if k.mode == "int8" else (k.packed, k.scale_zero) if k.mode == "int4"
            else (k.qweight, k.scales, k.zeros) for k in kernels]
    modes = sorted({k.mode for k in kernels})
    op = {"int8": "aten._weight_int8pack_mm", "int4": "aten._weight_int4pack_mm_for_cpu"}

    def step(xs):
        return [k(xs[k.n_in]) for k in kernels]
    return Variant(f"ours-{fmt}", " + ".join(op.get(m, m) for m in modes), step,
                   [q.dequantize(torch.float32) for q in layers],
                   sum(_nbytes(t) for ts in held for t in ts if t is not None))


def _linear(w: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w.to(dtype or w.dtype).clone(), requires_grad=False)
    return lin


def torchao_variants(weights: list) -> tuple[list[Variant], str]:
    """torchao's weight-only int8 and CPU int4 (group 32), or ([], why not)."""
    try:
        import torchao
        from torchao.prototype.quantization.int4.inference_workflow import (
            PrototypeInt4WeightOnlyConfig,
        )
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        from torchao.quantization.quant_primitives import (
            MappingType,
            _choose_qparams_affine_tinygemm,
            _dequantize_affine_tinygemm,
            _quantize_affine_tinygemm,
        )
    except Exception as e:  # noqa: BLE001 - any import failure means: no torchao row
        return [], f"torchao not importable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"

    def int4_ref(w):  # what Int4OpaqueTensor.from_hp stores, dequantized with torchao's primitives
        block = (1, GROUP)
        s, z = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, 1e-6,
                                               None, w.dtype)
        q = _quantize_affine_tinygemm(w, block, s, z, torch.int32, 0, 15)
        return _dequantize_affine_tinygemm(q, block, s, z, torch.int32, 0, 15, output_dtype=torch.float32)

    out = []
    for fmt, config in (("int8", Int8WeightOnlyConfig()), ("int4", PrototypeInt4WeightOnlyConfig(group_size=GROUP))):
        stack = nn.ModuleList(_linear(w, torch.bfloat16) for w in weights)
        bf16 = [m.weight.detach().clone() for m in stack]
        quantize_(stack, config)
        refs = ([m.weight.dequantize().float() for m in stack] if fmt == "int8" else [int4_ref(w) for w in bf16])
        kind = type(stack[0].weight).__name__

        def step(xs, stack=stack):
            return [m(xs[m.in_features]) for m in stack]
        out.append(Variant(f"ao-{fmt}", f"torchao {torchao.__version__} {kind}", step, refs,
                           sum(_nbytes(m.weight) for m in stack)))
    return out, f"torchao {torchao.__version__}"


def compiled(v: Variant) -> Variant:
    step = torch.compile(v.step)
    return Variant(f"{v.name}+compile", f"{v.kernel}, torch.compile", step, v.refs, v.weight_bytes, v.act_dtype, v.tol)


def check(v: Variant, xs: dict) -> float:
    """Largest relative error (Frobenius) over the step's outputs against x (as the kernel sees it)
    times the variant's own dequantized weight, in fp32."""
    x = {k: t.to(v.act_dtype) for k, t in xs.items()}
    errs = []
    for y, w in zip(v.step(x), v.refs, strict=True):
        ref = x[w.shape[1]].float() @ w.t()
        errs.append(float((y.float() - ref).norm() / ref.norm()))
    return max(errs)


def _progress(what: str, since: float) -> float:
    print(f"[kernels] {what}: {time.perf_counter() - since:.1f} s", file=sys.stderr)
    return time.perf_counter()


def run(dims: dict, layers: int, repeats: int, compile_: bool = True, torchao: bool = True) -> dict:
    clock, load_before = time.perf_counter(), round(os.getloadavg()[0], 2)
    torch.manual_seed(0)
    shapes = stack_shapes(dims, layers)
    weights = [torch.randn(n, k) * 0.02 for _, n, k in shapes]
    xs = {k: torch.randn(1, k) for k in {k for _, _, k in shapes}}
    variants = [_dense("fp32", weights, torch.float32), _dense("bf16", weights, torch.bfloat16),
                _ours("int8", weights), _ours("int4", weights)]
    notes, version = [], None
    if torchao:
        ao, version = torchao_variants(weights)
        if not ao:
            notes.append(f"torchao rows skipped: {version}")
            version = None
        variants += ao
    else:
        notes.append("torchao rows skipped: not asked for")
    compile_s = {}
    clock = _progress(f"{len(variants)} variants built", clock)
    with torch.no_grad():
        if compile_:
            for v in [v for v in variants if v.name.startswith(("ours", "ao"))]:
                c = compiled(v)
                t0 = time.perf_counter()
                c.step({k: t.to(c.act_dtype) for k, t in xs.items()})
                compile_s[c.name] = round(time.perf_counter() - t0, 1)
                variants.append(c)
        clock = _progress("compiled" if compile_ else "not compiled", clock)
        for v in variants:
            v.max_err = check(v, xs)
        clock = _progress("outputs checked", clock)
        inputs = {v.name: {k: t.to(v.act_dtype) for k, t in xs.items()} for v in variants}
        for v in variants:  # warm-up
            v.step(inputs[v.name])
        order = random.Random(0)
        for _ in range(repeats):  # interleaved: one of each per repeat, in a shuffled order
            for v in order.sample(variants, len(variants)):
                t0 = time.perf_counter()
                v.step(inputs[v.name])
                v.times.append((time.perf_counter() - t0) * 1e3)
        _progress(f"{repeats} repeats timed", clock)
    base, base_min = statistics.median(variants[0].times), min(variants[0].times)
    rows = []
    for v in variants:
        ms = statistics.median(v.times)
        rows.append({"variant": v.name, "kernel": v.kernel, "ms": round(ms, 3), "min_ms": round(min(v.times), 3),
                     "ratio_to_fp32": round(ms / base, 3), "min_ratio_to_fp32": round(min(v.times) / base_min, 3),
                     "weight_bytes": v.weight_bytes,
                     "gb_per_s": round(v.weight_bytes / min(v.times) / 1e6, 2), "max_rel_err": v.max_err, "tol": v.tol,
                     "ok": bool(v.max_err <= v.tol)})
    return {"schema": "cqil.kernels/1", "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchao": version, "layers": layers, "repeats": repeats,
            "matmuls": len(shapes), "shapes": sorted({f"{n}x{k}" for _, n, k in shapes}),
            "compile_s": compile_s, "loadavg_1min": [load_before, round(os.getloadavg()[0], 2)],
            "notes": notes, "rows": rows}


def table(result: dict) -> str:
    lines = [f"cpu: {result['cpu']}  threads: {result['threads']}  torch {result['torch']}  "
             f"torchao {result['torchao'] or '-'}",
             f"one decode step: {result['layers']} layers + head = {result['matmuls']} matmuls (M=1), "
             f"{result['repeats']} interleaved repeats; load average {result['loadavg_1min'][0]} before, "
             f"{result['loadavg_1min'][1]} after",
             f"{'variant':<18} {'median':>8} {'x fp32':>7} {'min ms':>8} {'x fp32':>7} {'weight MB':>10} "
             f"{'GB/s':>7} {'max err':>9} {'ok':>3}  kernel"]
    for r in result["rows"]:
        lines.append(f"{r['variant']:<18} {r['ms']:>8.2f} {r['ratio_to_fp32']:>7.3f} {r['min_ms']:>8.2f} "
                     f"{r['min_ratio_to_fp32']:>7.3f} "
                     f"{r['weight_bytes'] / 1e6:>10.1f} {r['gb_per_s']:>7.1f} {r['max_rel_err']:>9.1e} "
                     f"{'yes' if r['ok'] else 'NO':>3}  {r['kernel']}")
    if result["compile_s"]:
        lines.append("compile seconds: " + ", ".join(f"{k} {v}" for k, v in result["compile_s"].items()))
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None, dims: dict | None = None) -> dict:
    """dims: shapes to use instead of the default model's (tests pass tiny ones)."""
    p = argparse.ArgumentParser(prog="python -m cqil_cli.benchmarks.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=None, help="decoder layers in the stack (default: the model's)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", default=None, help="write the result document here")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--no-torchao", action="store_true", help="skip torchao even when importable")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    source = "given"
    if dims is None:
        dims, source = model_dims()
    layers = args.layers if args.layers is not None else int(dims["num_hidden_layers"])
    result = run(dims, layers, args.repeats, not args.no_compile, not args.no_torchao)
    result["shapes_from"] = source
    print(table(result))
    print(f"shapes from: {source}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
