"""Predicted decode latency per token of CQIL+TP against TP on W ranks, for big published shapes.

    python -m cqil_cli.benchmarks.predict_parallel [--context 512] [--efficiency 0.83]
        [--layer-overhead-us 45] [--json PATH]

Nothing is measured here: the alpha-beta model of the distributed engine
(calibrate/parallel_latency.py) is fed published hardware figures (every one with its source
in FIGURES below and in docs/performance.md) and published model configs, batch 1, fp16:
  compute      a layer costs a fixed overhead plus the slowest rank's bytes (weights and the KV
               cache of --context tokens) over the achieved HBM bandwidth (datasheet x efficiency)
  collectives  alpha from small-message NCCL measurements, beta from the link bandwidth
It prints the table of docs/performance.md ("Predicted: CQIL+TP vs TP at scale"), then the
same model's plain TP against gpt-fast's measured tensor-parallel decode on A100s, as a check.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..calibrate.parallel_latency import (
    ALL_GATHER,
    ALL_REDUCE,
    CollectiveCost,
    DecoderShape,
    ParallelLatencyModel,
    collectives_by_key,
)
from ..calibrate.search import uniform_groups
from ..core.files import write_json_atomic

FP16 = 2
# Published configs (config.json on the Hugging Face Hub: meta-llama/Llama-2-7b-hf,
# huggyllama/llama-30b (the paper's "LLaMA-33B"), meta-llama/Llama-2-70b-hf).
LLAMA2_7B = DecoderShape("Llama-2-7B", 32, 4096, 32, 32, 11008, 32000)
LLAMA_33B = DecoderShape("LLaMA-33B", 60, 6656, 52, 52, 17920, 32000)
LLAMA2_70B = DecoderShape("Llama-2-70B", 80, 8192, 64, 8, 28672, 32000)

# (shape, W, groups, where the grouping comes from). Papers' notation S-E-P: layers S..E-1 in
# consecutive groups of P (0-based), the others single.
CASES = [
    (LLAMA2_7B, 2, (12, 30, 2), "authors' repo: LLaMA-7B-S12-E30-P2"),
    (LLAMA2_7B, 4, (14, 30, 4), "authors' repo: LLaMA-7B-S14-E30-P4"),
    (LLAMA_33B, 4, (18, 58, 4), "assumed: 10 quads, 30 of 60 steps"),
    (LLAMA2_70B, 8, (26, 78, 4), "assumed: 13 quads, 41 of 80 steps"),
]


@dataclass(frozen=True)
class Platform:
    """The figures of one kind of node; `ib` set: W ranks over two nodes (W/2 GPUs each)."""

    name: str
    hbm_bytes_per_s: float  # datasheet
    link_bytes_per_s: float  # NVLink, one direction (datasheet's bidirectional / 2)
    link_efficiency: float  # nccl-tests bus bandwidth / link bandwidth
    alpha_us: dict  # n ranks in a node -> small-message all-reduce / all-gather latency
    ib_alpha_us: float = 0.0  # collectives that cross the two nodes
    ib_bus_bytes_per_s: float = 0.0  # per GPU (one NIC per GPU)

    def collectives(self, world_size: int) -> dict:
        """(kind, n) -> cost for n = 2, 4, 8; on two nodes a group of more than W/2 ranks
        crosses InfiniBand (lanes are consecutive ranks, so smaller ones stay in a node)."""
        costs = []
        for n in (2, 4, 8):
            crosses = bool(self.ib_bus_bytes_per_s) and n > world_size // 2
            alpha = (self.ib_alpha_us if crosses else self.alpha_us[n]) * 1e-6
            bus = self.ib_bus_bytes_per_s if crosses else \
                self.link_bytes_per_s * self.link_efficiency
            costs += [CollectiveCost.from_bus_bandwidth(kind, n, alpha, bus)
                      for kind in (ALL_REDUCE, ALL_GATHER)]
        return collectives_by_key(costs)


A100 = Platform("A100 SXM 80GB, NVSwitch", 2.039e12, 300e9, 0.80, {2: 10.1, 4: 13.0, 8: 16.0})
H100 = Platform("H100 SXM, NVSwitch", 3.35e12, 450e9, 0.81, {2: 6.0, 4: 11.0, 8: 16.5})
A100_IB = Platform("2 A100 nodes, HDR IB", 2.039e12, 300e9, 0.80, {2: 10.1, 4: 13.0, 8: 16.0},
                   ib_alpha_us=46.5, ib_bus_bytes_per_s=0.94 * 25e9)
H100_IB = Platform("2 H100 nodes, NDR IB", 3.35e12, 450e9, 0.81, {2: 6.0, 4: 11.0, 8: 16.5},
                   ib_alpha_us=46.5, ib_bus_bytes_per_s=47e9)

FIGURES = {  # figure -> source (links in docs/performance.md)
    "A100 80GB SXM HBM 2,039 GB/s, NVLink 600 GB/s": "NVIDIA A100 datasheet",
    "H100 SXM HBM 3.35 TB/s, NVLink 900 GB/s": "NVIDIA H100 product page / datasheet",
    "efficiency 0.83": "gpt-fast README: ~1700 GB/s empirical peak on an A100-80GB (of 2,039)",
    "layer overhead 45 us": "docs/performance.md: 1.44 ms/token, 30 layers, H100, CUDA graph",
    "all-reduce 10.1 us, 2 A100": "NVIDIA/nccl#583 (nccl-tests, 2x A100-SXM4, 32 B)",
    "all-reduce ~6 us, 2 H100": "NVIDIA/nccl#1259 (nccl-tests, HGX H100, NVLS, CUDA graphs)",
    "all-reduce 16.5 us, 8 Hopper": "deepseek-ai/DeepEP#303 (nccl-tests, 8x H20, 2-4 KB)",
    "all-reduce 46.5 us, 2 nodes": "NVIDIA/nccl#1244 (nccl-tests, 2x8 H20, NDR IB, 4-512 B)",
    "H100 bus efficiency 0.81": "NVIDIA/nccl#1455 (ring busbw 365-370 GB/s of 450)",
    "NDR 47 GB/s per NIC": "NVIDIA/nccl-tests#290 (46-48 GB/s per 400 Gb/s NIC)",
    "HDR 0.94 x 25 GB/s": "NVIDIA/nccl-tests#119 (A100, 4 HDR NICs: up to 96 of 100 GB/s)",
}
# gpt-fast README: tokens/s at batch 1, 8xA100-80GB power-limited to 330 W, torch.compile,
# tensor parallelism with ENABLE_INTRA_NODE_COMM=1, a 5-token prompt (so a short context).
GPT_FAST_TP = {(LLAMA2_7B, 1): 104.9, (LLAMA2_7B, 2): 168.84, (LLAMA2_7B, 4): 254.02,
               (LLAMA2_7B, 8): 328.43, (LLAMA2_70B, 2): 21.32, (LLAMA2_70B, 4): 38.01,
               (LLAMA2_70B, 8): 62.50}


def build_model(shape: DecoderShape, world_size: int, platform: Platform,
                args: argparse.Namespace, context: int | None = None) -> ParallelLatencyModel:
    kernel_s = args.layer_overhead_us * 1e-6 / 17  # ~17 kernels per layer (docs/performance.md)
    compute = shape.compute_cost(
        world_size, FP16, platform.hbm_bytes_per_s, args.layer_overhead_us * 1e-6,
        context_tokens=args.context if context is None else context, efficiency=args.efficiency,
        head_overhead_s=3 * kernel_s, embed_s=3 * kernel_s)
    return ParallelLatencyModel(shape.hidden_size, shape.vocab_size, FP16, compute,
                                platform.collectives(world_size),
                                f"{platform.name}, published figures")


def predict_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for shape, w, (start, end, p), origin in CASES:
        platforms = [A100, H100] + ([A100_IB, H100_IB] if w == 8 else [])
        groups = uniform_groups(start, end, p, shape.num_layers)
        for platform in platforms:
            model = build_model(shape, w, platform, args)
            tp = model.tensor_parallel_token_s(shape.num_layers, w)
            row = {"model": shape.name, "world_size": w, "platform": platform.name,
                   "grouping": f"S{start}-E{end}-P{p}", "grouping_source": origin,
                   "steps": len(groups), "layers": shape.num_layers,
                   "tp_ms": tp.seconds * 1e3, "tp_collectives": tp.collectives}
            for d in (0, 1):
                ours = model.predict_token_s(groups, d, w)
                row[f"cqil_d{d}_ms"] = ours.seconds * 1e3
                row[f"cqil_d{d}_ratio"] = ours.seconds / tp.seconds
                row[f"cqil_d{d}_collectives"] = ours.collectives
            rows.append(row)
    return rows


def check_rows(args: argparse.Namespace) -> list[dict]:
    """The model's plain TP on A100s against gpt-fast's measured tokens/s (context ~100)."""
    out = []
    for (shape, w), tokens_per_s in GPT_FAST_TP.items():
        model = build_model(shape, w, A100, args, context=100)
        predicted = model.tensor_parallel_token_s(shape.num_layers, w).seconds * 1e3
        out.append({"model": shape.name, "world_size": w, "measured_ms": 1e3 / tokens_per_s,
                    "predicted_ms": predicted, "ratio": predicted * tokens_per_s / 1e3})
    return out


def print_tables(rows: list[dict], checks: list[dict], args: argparse.Namespace) -> None:
    print(f"Predicted decode ms per token, batch 1, fp16, context {args.context} tokens, "
          f"HBM efficiency {args.efficiency}, layer overhead {args.layer_overhead_us:g} us\n")
    print("| model | W | hardware | grouping | steps | TP ms | CQIL+TP D=0 ms (x TP) "
          "| CQIL+TP D=1 ms (x TP) | collectives TP / D=0 / D=1 |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['world_size']} | {r['platform']} | {r['grouping']} "
              f"| {r['steps']}/{r['layers']} | {r['tp_ms']:.2f} "
              f"| {r['cqil_d0_ms']:.2f} ({r['cqil_d0_ratio']:.3f}) "
              f"| {r['cqil_d1_ms']:.2f} ({r['cqil_d1_ratio']:.3f}) "
              f"| {r['tp_collectives']} / {r['cqil_d0_collectives']} / "
              f"{r['cqil_d1_collectives']} |")
    print("\nCheck: the same model's plain TP on A100s against gpt-fast's measured decode "
          "(context 100)\n")
    print("| model | W | gpt-fast measured ms | predicted ms | predicted / measured |")
    print("|---|---:|---:|---:|---:|")
    for c in checks:
        print(f"| {c['model']} | {c['world_size']} | {c['measured_ms']:.2f} "
              f"| {c['predicted_ms']:.2f} | {c['ratio']:.2f} |")
    print("\nFigures and sources:")
    for figure, source in FIGURES.items():
        print(f"  {figure}: {source}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512,
                        help="tokens in the KV cache each decode step reads")
    parser.add_argument("--efficiency", type=float, default=0.83,
                        help="fraction of the datasheet HBM bandwidth weight streaming reaches")
    parser.add_argument("--layer-overhead-us", type=float, default=45.0,
                        help="fixed cost of one layer's kernels on one rank")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows, checks = predict_rows(args), check_rows(args)
    print_tables(rows, checks, args)
    if args.json:
        write_json_atomic(Path(args.json), {"settings": vars(args), "rows": rows,
                                            "gpt_fast_check": checks, "figures": FIGURES})


if __name__ == "__main__":
    main()
