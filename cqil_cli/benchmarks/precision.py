"""Benchmark (not a test): a bf16 linear layer's forward + backward on this machine, computed
in bf16 (torch's own kernels), through calibrate/precision.py's fp32 compute (what tuning at
precision "fp32" does with a bf16 model), and with fp32 weights, side by side.

On a CPU without bf16 units torch's bf16 matmuls take a generic path whose speed depends on the
operands' layout; the backward's products (g W, gᵀ x) are the slow ones. This shows how much
fp32 compute buys there, at the shapes of a real model's MLP (default: Llama-3.2-1B's,
d = 2048, I = 8192) and a tuning batch (4 windows of 16 tokens, as the scale benchmark's
convert runs them).

    python -m cqil_cli.benchmarks.precision [--tokens 64] [--repeats 3] [--threads N] [--json PATH]

Median seconds per forward + backward (the weight and the input both trainable), first call
excluded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {"up/gate [8192, 2048]": (2048, 8192), "down [2048, 8192]": (8192, 2048)}


def _seconds(fn, x: torch.Tensor, layer: torch.nn.Linear, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        layer.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        start = time.perf_counter()
        fn(layer, xi).float().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(tokens: int, repeats: int, shapes: dict = SHAPES) -> list[dict]:
    from ..calibrate.precision import fp32_linears

    def plain(layer, x):
        return layer(x)

    def in_fp32(layer, x):
        with fp32_linears("fp32", layer):
            return layer(x)

    rows = []
    for name, (d_in, d_out) in shapes.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, d_in, generator=g)
        layer = torch.nn.Linear(d_in, d_out, bias=False)
        fp32 = _seconds(plain, x, layer, repeats)
        layer = layer.to(torch.bfloat16)
        bf16 = _seconds(plain, x.to(torch.bfloat16), layer, repeats)
        upcast = _seconds(in_fp32, x.to(torch.bfloat16), layer, repeats)
        rows.append({"matrix": name, "tokens": tokens, "bf16_s": bf16, "bf16_fp32_compute_s": upcast,
                     "fp32_s": fp32, "speedup_of_fp32_compute": bf16 / upcast})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args.tokens, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seconds per forward + "
          f"backward of {args.tokens} tokens (median of {args.repeats})")
    print("| matrix | bf16 | bf16, fp32 compute | fp32 | fp32 compute vs bf16 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['matrix']} | {r['bf16_s']:.3f} | {r['bf16_fp32_compute_s']:.3f} | "
              f"{r['fp32_s']:.3f} | {r['speedup_of_fp32_compute']:.1f}× |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
