"""Predicted decode latency per token of CQIL+TP against TP on W ranks, for big published shapes.

    python -m cqil_cli.benchmarks.predict_parallel [--context 512] [--efficiency 0.83]
        [--layer-overhead-us 45] [--compute-json PATH] [--json PATH]

Nothing is measured here: the alpha-beta model of the distributed engine
(search/parallel_latency.py) is fed published hardware figures (every one with its source
in FIGURES below and in docs/performance.md) and published model configs, batch 1, fp16:
  compute      a layer costs a fixed overhead plus the slowest rank's bytes (weights and the KV
               cache of --context tokens) over the achieved HBM bandwidth (datasheet x efficiency)
  collectives  alpha from small-message NCCL measurements, beta from the link bandwidth
It prints the table of docs/performance.md ("Predicted: CQIL+TP vs TP at scale"), then the
same model's plain TP against gpt-fast's measured tensor-parallel decode on A100s, as a check.

--compute-json PATH (a document of benchmarks/layer_compute.py, measured on an H200) adds one
row per case for "H200 SXM, NVSwitch (layer compute measured)": compute per layer slice, head
and embedding as measured there (CUDA-graph times, eager where there is none; its dtype and
context), collectives the H100 NVSwitch figures (H200 SXM has the same NVLink 4, 900 GB/s).
Without it the output is the published-figures table alone.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.documents import Schema, read_json
from ..core.errors import CqilError
from ..core.files import write_json_atomic
from ..search.parallel_latency import (
    ALL_GATHER,
    ALL_REDUCE,
    CollectiveCost,
    ComputeCost,
    DecoderShape,
    ParallelLatencyModel,
    collectives_by_key,
)
from ..search.partitions import uniform_groups

FP16 = 2
# Published configs (config.json on the Hugging Face Hub: meta-llama/Llama-2-7b-hf,
# huggyllama/llama-30b (the paper's "LLaMA-33B"), meta-llama/Llama-2-70b-hf).
LLAMA2_7B = DecoderShape("Llama-2-7B", 32, 4096, 32, 32, 11008, 32000)
LLAMA_33B = DecoderShape("LLaMA-33B", 60, 6656, 52, 52, 17920, 32000)
LLAMA2_70B = DecoderShape("Llama-2-70B", 80, 8192, 64, 8, 28672, 32000)
# meta-llama/Llama-3.1-8B (measured by benchmarks/layer_compute.py; no published grouping)
LLAMA31_8B = DecoderShape("Llama-3.1-8B", 32, 4096, 32, 8, 14336, 128256)

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
# --compute-json only: compute measured on the device, collectives H100's (the same NVLink 4)
H200_MEASURED = replace(H100, name="H200 SXM, NVSwitch (layer compute measured)",
                        hbm_bytes_per_s=4.8e12)

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
MEASURED_FIGURES = {  # --compute-json only
    "H200 SXM HBM 4.8 TB/s, NVLink 900 GB/s (NVLink 4, as H100 SXM: its collective figures)":
        "NVIDIA H200 datasheet",
    "H200 compute per layer slice, head, embedding":
        "measured: python -m cqil_cli.benchmarks.layer_compute --json (the --compute-json file)",
}
# The document of benchmarks/layer_compute.py that --compute-json reads (written there).
COMPUTE_SCHEMA = Schema(
    "cqil.layer_compute", 1,
    "a layer compute document (python -m cqil_cli.benchmarks.layer_compute --json)",
    "run python -m cqil_cli.benchmarks.layer_compute --json PATH again")
COMPUTE_SIZES = (1, 2, 4, 8)  # its lane sizes t (layer slices) and world sizes W (head, embed)
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


def measured_compute_cost(doc: dict, shape_name: str, world_size: int) -> ComputeCost | None:
    """The ComputeCost of `shape_name` on W ranks from a layer compute document: layer_s per
    lane size t dividing W, head_s[W] and embed_s of W, each the CUDA-graph time where there
    is one, else the eager time; overhead 0 (as predict_parallel's modelled rows). None when
    the document lacks the shape or one of the sizes."""
    shape = doc["shapes"].get(shape_name)
    if shape is None:
        return None

    def seconds(part: str, n: int) -> float | None:
        entry = shape[part].get(str(n))
        if entry is None:
            return None
        return entry["graph_s"] if entry.get("graph_s") else entry["eager_s"]

    layers = {t: seconds("layer", t) for t in COMPUTE_SIZES if world_size % t == 0}
    head, embed = seconds("head", world_size), seconds("embed", world_size)
    if head is None or embed is None or any(v is None for v in layers.values()):
        return None
    return ComputeCost(layers, {world_size: head}, embed)


def read_compute_document(path: Path) -> dict:
    """A layer compute document from `path` (its schema tag checked)."""
    return COMPUTE_SCHEMA.check(read_json(path, COMPUTE_SCHEMA.what), str(path))


def measured_model(shape: DecoderShape, world_size: int,
                   compute_doc: dict) -> ParallelLatencyModel | None:
    """H200_MEASURED's model: compute from a layer compute document (None: it lacks the shape
    or a size), collectives H100 NVSwitch's."""
    compute = measured_compute_cost(compute_doc, shape.name, world_size)
    if compute is None:
        return None
    element = {"float32": 4, "bfloat16": 2, "float16": 2}.get(compute_doc["dtype"])
    if element is None:
        raise CqilError(f"--compute-json: measured in {compute_doc['dtype']!r}; expected "
                        "float32, bfloat16 or float16")
    return ParallelLatencyModel(shape.hidden_size, shape.vocab_size, element, compute,
                                H200_MEASURED.collectives(world_size),
                                f"{H200_MEASURED.name}: {compute_doc['device']}")


def predict_rows(args: argparse.Namespace, compute_doc: dict | None = None) -> list[dict]:
    rows = []
    for shape, w, (start, end, p), origin in CASES:
        platforms = [A100, H100] + ([H200_MEASURED] if compute_doc else []) \
            + ([A100_IB, H100_IB] if w == 8 else [])
        groups = uniform_groups(start, end, p, shape.num_layers)
        for platform in platforms:
            if platform is H200_MEASURED:
                model = measured_model(shape, w, compute_doc)
                if model is None:
                    continue
            else:
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


def print_tables(rows: list[dict], checks: list[dict], args: argparse.Namespace,
                 compute_doc: dict | None = None) -> None:
    print(f"Predicted decode ms per token, batch 1, fp16, context {args.context} tokens, "
          f"HBM efficiency {args.efficiency}, layer overhead {args.layer_overhead_us:g} us\n")
    if compute_doc:
        print(f"Rows '{H200_MEASURED.name}': compute measured on {compute_doc['device']} "
              f"(torch {compute_doc['torch']}, {compute_doc['dtype']}, context "
              f"{compute_doc['context']} tokens; CUDA-graph times, eager where none), "
              f"collectives as H100 SXM's\n")
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
    for figure, source in {**FIGURES, **(MEASURED_FIGURES if compute_doc else {})}.items():
        print(f"  {figure}: {source}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512,
                        help="tokens in the KV cache each decode step reads")
    parser.add_argument("--efficiency", type=float, default=0.83,
                        help="fraction of the datasheet HBM bandwidth weight streaming reaches")
    parser.add_argument("--layer-overhead-us", type=float, default=45.0,
                        help="fixed cost of one layer's kernels on one rank")
    parser.add_argument("--compute-json",
                        help="a benchmarks/layer_compute.py document: adds the rows of "
                             "'H200 SXM, NVSwitch (layer compute measured)'")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    compute_doc, compute_json = None, args.compute_json
    if not compute_json:
        del args.compute_json  # the settings written without the flag stay as they were
    try:
        if compute_json:
            compute_doc = read_compute_document(Path(compute_json))
        rows, checks = predict_rows(args, compute_doc), check_rows(args)
    except CqilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_tables(rows, checks, args, compute_doc)
    if args.json:
        figures = {**FIGURES, **(MEASURED_FIGURES if compute_doc else {})}
        write_json_atomic(Path(args.json), {"settings": vars(args), "rows": rows,
                                            "gpt_fast_check": checks, "figures": figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
