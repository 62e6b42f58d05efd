"""Decode compute per token of one rank's slice of a layer, and of the head, measured on a device.

    python -m cqil_cli.benchmarks.layer_compute [--device cuda] [--dtype bfloat16]
        [--context 512] [--shapes big|tiny] [--repeats 30] [--json PATH]

For each published shape of benchmarks/predict_parallel.py (Llama-2-7B, LLaMA-33B, Llama-2-70B,
Llama-3.1-8B; `--shapes tiny`: a tiny shape that runs in seconds on a CPU) it times, batch 1:
  layer  one rank's slice of a layer on a lane of t ranks, t in 1, 2, 4, 8 (those the shape's kv
         heads allow), exactly the slice the distributed engine runs, with a KV cache of
         --context tokens (search/parallel_probe.py: layer_slice_step, the same code the
         probe times); the slowest rank's (rank 0's) slice when heads do not divide evenly
  head   final norm + one rank's ⌈V/W⌉ rows of the lm_head, W in 1, 2, 4, 8
  embed  one rank's vocab-parallel embedding lookup, W in 1, 2, 4, 8
The weights are random (time depends on shapes and dtype only); copies of each slice are
cycled so that no timed call finds its weights in a cache. Two timings of each:
  eager  the step's modules called from Python, as the engine runs today
  graph  a torch.cuda.CUDAGraph capture of the same step, replayed (as served engines run;
         CUDA only)
Each is the median of --repeats calls after warm-up, the device synchronised around each call.
"bytes" is what one token reads (the slice's weights and its KV cache); bytes/s is bytes over
seconds, the bandwidth the step achieves. `--json` writes a `cqil.layer_compute/1` document,
which `python -m cqil_cli.benchmarks.predict_parallel --compute-json PATH` reads.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from ..core.errors import CqilError
from ..core.files import write_json_atomic
from ..search.parallel_latency import DecoderShape
from ..search.parallel_probe import (
    SliceStep,
    embed_slice_step,
    head_slice_step,
    layer_slice_step,
    timed_seconds,
)
from .predict_parallel import (
    COMPUTE_SCHEMA,
    COMPUTE_SIZES,
    LLAMA2_7B,
    LLAMA2_70B,
    LLAMA31_8B,
    LLAMA_33B,
)

TINY = DecoderShape("tiny", 2, 64, 4, 2, 96, 259)
SHAPES = {"big": (LLAMA2_7B, LLAMA31_8B, LLAMA_33B, LLAMA2_70B), "tiny": (TINY,)}


def cqil_config(shape: DecoderShape, context_tokens: int):
    """A one-layer CqilConfig of `shape` (a Llama; every layer single), for the slice steps."""
    from transformers import LlamaConfig

    from ..runtime.configuration_cqil import CqilConfig

    base = LlamaConfig(num_hidden_layers=1, hidden_size=shape.hidden_size,
                       num_attention_heads=shape.num_heads,
                       num_key_value_heads=shape.num_kv_heads, head_dim=shape.dim_per_head,
                       intermediate_size=shape.intermediate_size, vocab_size=shape.vocab_size,
                       max_position_embeddings=max(4096, context_tokens + 1), rms_norm_eps=1e-5)
    return CqilConfig.from_base_config(base, None, 0)


def lane_sizes(shape: DecoderShape) -> list[int]:
    """The lane sizes a layer of `shape` can run on (a kv head and an MLP column per rank)."""
    return [t for t in COMPUTE_SIZES if t <= min(shape.num_kv_heads, shape.intermediate_size)]


def graph_replay(fn, device: torch.device):
    """fn captured as a CUDA graph (after warm-up on a side stream, as torch's docs do it);
    returns the graph's replay, which runs the same kernels on the same tensors."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay  # the bound method keeps the graph (and its memory pool) alive


def measure(step: SliceStep, device: torch.device, repeats: int) -> dict:
    """Eager and (on CUDA) CUDA-graph seconds per token of one slice step, and its bytes."""
    eager = timed_seconds(step.run, repeats, device, warmup=3) / step.copies
    graph, graph_error = None, None
    if device.type == "cuda":
        try:
            replay = graph_replay(step.run, device)
            graph = timed_seconds(replay, repeats, device, warmup=3) / step.copies
            del replay
        except RuntimeError as exc:  # recorded: the eager time still stands
            graph_error = f"{type(exc).__name__}: {exc}"[:300]
            print(f"CUDA graph failed: {graph_error}", file=sys.stderr, flush=True)
    nbytes = step.bytes_per_token
    return {"copies": step.copies, "weight_bytes": step.weight_bytes,
            "cache_bytes": step.cache_bytes, "bytes": nbytes,
            "eager_s": eager, "graph_s": graph,
            "eager_bytes_per_s": nbytes / eager if eager > 0 else None,
            "graph_bytes_per_s": nbytes / graph if graph else None,
            **({"graph_error": graph_error} if graph_error else {})}


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure_shape(shape: DecoderShape, device: torch.device, dtype: torch.dtype,
                  context_tokens: int, repeats: int) -> dict:
    """Every part of one shape: {"config", "layer": {t: ...}, "head": {W: ...},
    "embed": {W: ...}} (keys as strings, as in the JSON)."""
    config = cqil_config(shape, context_tokens)
    out = {"config": asdict(shape), "layer": {}, "head": {}, "embed": {}}
    settings = dict(device=device, dtype=dtype)
    with torch.no_grad():
        for t in lane_sizes(shape):
            step = layer_slice_step(config, t, context_tokens=context_tokens, **settings)
            out["layer"][str(t)] = measure(step, device, repeats)
            del step
            _free(device)
        for w in COMPUTE_SIZES:
            for part, make in (("head", head_slice_step), ("embed", embed_slice_step)):
                step = make(config, w, **settings)
                out[part][str(w)] = measure(step, device, repeats)
                del step
                _free(device)
    return out


def run(device: str = "cpu", dtype: str = "float32", context_tokens: int = 512,
        shapes: str = "tiny", repeats: int = 30) -> dict:
    """The `cqil.layer_compute/1` document of every shape of SHAPES[shapes]."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CqilError("--device cuda: torch sees no CUDA device here")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise CqilError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    doc = {"schema": COMPUTE_SCHEMA.tag, "device": name, "torch": torch.__version__,
           "dtype": dtype, "context": context_tokens, "batch": 1, "repeats": repeats,
           "threads": torch.get_num_threads(), "shapes": {}}
    for shape in SHAPES[shapes]:
        start = time.perf_counter()
        try:
            doc["shapes"][shape.name] = measure_shape(shape, dev, torch_dtype, context_tokens,
                                                      repeats)
        except (RuntimeError, MemoryError) as exc:  # e.g. out of memory: the others still run
            traceback.print_exc(file=sys.stderr)
            doc.setdefault("errors", {})[shape.name] = f"{type(exc).__name__}: {exc}"[:300]
            _free(dev)
        print(f"{shape.name}: measured in {time.perf_counter() - start:.1f} s", file=sys.stderr,
              flush=True)
    return doc


def print_table(doc: dict) -> None:
    print(f"Decode compute per token of one rank's slice, {doc['device']}, torch {doc['torch']}, "
          f"{doc['dtype']}, batch 1, context {doc['context']} tokens, median of "
          f"{doc['repeats']}\n")
    print("| model | part | t or W | copies | MB per token | eager us | graph us "
          "| eager GB/s | graph GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")

    def cell(value, scale, digits):
        return "-" if value is None else f"{value * scale:.{digits}f}"

    for name, shape in doc["shapes"].items():
        for part in ("layer", "head", "embed"):
            for n, e in shape[part].items():
                print(f"| {name} | {part} | {n} | {e['copies']} | {e['bytes'] / 1e6:.2f} "
                      f"| {cell(e['eager_s'], 1e6, 1)} | {cell(e['graph_s'], 1e6, 1)} "
                      f"| {cell(e['eager_bytes_per_s'], 1e-9, 1)} "
                      f"| {cell(e['graph_bytes_per_s'], 1e-9, 1)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--context", type=int, default=512,
                        help="tokens in the KV cache each decode step reads")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="big")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="also write the cqil.layer_compute/1 document here")
    args = parser.parse_args(argv)
    try:
        doc = run(args.device, args.dtype, args.context, args.shapes, args.repeats)
    except CqilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_table(doc)
    if args.json:
        write_json_atomic(Path(args.json), doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
