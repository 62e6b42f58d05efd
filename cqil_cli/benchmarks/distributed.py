"""CQIL+TP against tensor parallelism on W local ranks, and the alpha-beta model's predictions.

    python -m cqil_cli.benchmarks.distributed [--world 2] [--repeats 5] [--rounds 2]
        [--new-tokens 64] [--json PATH]

On the default model (SmolLM2-135M, 30 layers), batch 1, a 128-token prompt (seeded random
ids) and 64 new tokens, one thread per rank, all in one run:
  tp                 the original under tensor parallelism on W ranks (every layer its own step)
  tp-replicated      the same with the embedding and lm_head replicated instead of vocab-parallel
  cqil-24, cqil-16   pairs 14-15,...,24-25 (24 steps) and 2-3,...,28-29 (16 steps), bypass 1,
                     on W ranks: a pair's members on lanes of W/2 ranks (CQIL+TP)
  one process        the same three models on cqil's one-device engine (fastgen), in one
                     process with W threads
Each distributed row is one launch of W processes (bench/distributed.py: a warm-up run, then
--repeats runs, the median per-token decode time); the launches are interleaved over --rounds
rounds and the median over rounds is reported. Then the alpha-beta model is measured on the
same W ranks (search/parallel_probe.py) and predicts every distributed row, and the
one-device latency model (search/latency_model.py) every one-process row; the error is
(predicted - measured) / measured. Weights are the default model's (the grouped rows untuned:
the values do not change the time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPT_LEN = 128
GROUPINGS = {  # name -> (groups spec, bypass distance)
    "tp": ("none", 0),
    "cqil-24": (",".join(f"{i}-{i + 1}" for i in range(14, 26, 2)), 1),
    "cqil-16": (",".join(f"{i}-{i + 1}" for i in range(2, 30, 2)), 1),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from ..bench.distributed import bench_on_ranks
    from ..inputs.models import load_model
    from ..runtime.checkpoint import build_cqil_model, parse_groups, save_converted
    from ..search.latency_model import decode_ms, measure_latency_model
    from ..search.parallel_probe import measure_parallel_model

    W, n_new = args.world, args.new_tokens
    loaded = load_model("default", device="cpu", dtype="float32")
    n = loaded.num_layers
    prompt = torch.randint(0, loaded.model.config.vocab_size, (1, PROMPT_LEN),
                           generator=torch.Generator().manual_seed(0))
    work = Path(tempfile.mkdtemp(prefix="cqil-bench-distributed-"))
    folders, models = {}, {}
    for name, (spec, bypass) in GROUPINGS.items():
        model = build_cqil_model(loaded.model, spec, bypass)
        models[name] = model
        folders[name] = str(loaded.path) if name == "tp" else str(
            save_converted(model, loaded.tokenizer, work / name))
    rows = {name: [] for name in [*GROUPINGS, "tp-replicated"]}
    started = time.perf_counter()
    for r in range(args.rounds):
        for name in rows:
            spec = folders["tp" if name == "tp-replicated" else name]
            print(f"round {r + 1}/{args.rounds}: {name} on {W} ranks", flush=True)
            section = bench_on_ranks([spec], W, prompt, n_new, warmup=1, repeats=args.repeats,
                                     threads=1, vocab_parallel=name != "tp-replicated")
            rows[name].append(section["rows"][0])
    measured = {name: statistics.median(row["decode_ms_per_token"]["p50"] for row in got)
                for name, got in rows.items()}

    print(f"one process, {W} threads", flush=True)
    torch.set_num_threads(W)
    one = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            one.setdefault(name, []).append(decode_ms(model, prompt, n_new, args.repeats))
    one = {name: statistics.median(v) for name, v in one.items()}

    print(f"alpha-beta model: measuring on {W} ranks", flush=True)
    parallel = measure_parallel_model(models["tp"].config, W,
                                      context_tokens=PROMPT_LEN + n_new // 2)
    one_device = measure_latency_model(loaded.model, 2, prompt_len=PROMPT_LEN,
                                       new_tokens=n_new)
    steps = {name: parse_groups(spec, n) for name, (spec, _) in GROUPINGS.items()}
    table = []
    for name in rows:
        key = "tp" if name == "tp-replicated" else name
        predicted = None
        if name != "tp-replicated":  # the model describes the vocab-parallel head
            predicted = 1e3 * parallel.predict_token_s(steps[key], GROUPINGS[key][1], W).seconds
        table.append(_row(f"{name} ({W} ranks)", measured[name], predicted,
                          measured[name] / measured["tp"], rows[name][0]))
    for name in GROUPINGS:
        table.append(_row(f"{name} (one process, {W} threads)", one[name],
                          one_device.predict_ms(steps[name]), one[name] / one["tp"], None))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__, "world_size": W, "prompt_tokens": PROMPT_LEN,
        "new_tokens": n_new, "repeats": args.repeats, "rounds": args.rounds,
        "seconds": round(time.perf_counter() - started, 1), "rows": table,
        "parallel_model": parallel.to_json(), "one_device_model": one_device.to_json(),
    }
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _row(name: str, measured: float, predicted: float | None, ratio: float,
         ranked: dict | None) -> dict:
    row = {"name": name, "decode_ms_per_token": measured, "ratio_to_tp": ratio,
           "predicted_ms_per_token": predicted,
           "prediction_error": None if predicted is None else (predicted - measured) / measured}
    if ranked is not None:
        row["ranks"] = [{"rank": r["rank"], "weight_fraction": r["weight_fraction"],
                         "peak_rss_mb": r["peak_rss_mb"]} for r in ranked["ranks"]]
    return row


def _print(result: dict) -> None:
    print(f"\n{result['machine']}, torch {result['torch']}; batch 1, prompt "
          f"{result['prompt_tokens']}, {result['new_tokens']} new tokens; median of "
          f"{result['rounds']} rounds x {result['repeats']} runs")
    print(f"{'':36s} {'decode ms/tok':>13s} {'÷ tp':>6s} {'predicted':>10s} {'error':>7s}  "
          "weights per rank / peak MB")
    for row in result["rows"]:
        predicted = row["predicted_ms_per_token"]
        error = row["prediction_error"]
        ranks = " ".join(f"{r['weight_fraction']:.3f}/{r['peak_rss_mb']:.0f}"
                         for r in row.get("ranks", []))
        print(f"{row['name']:36s} {row['decode_ms_per_token']:13.2f} {row['ratio_to_tp']:6.3f} "
              f"{'' if predicted is None else f'{predicted:10.2f}':>10s} "
              f"{'' if error is None else f'{100 * error:+6.1f}%':>7s}  {ranks}")


if __name__ == "__main__":
    main()
