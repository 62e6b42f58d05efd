"""Benchmark (not a test): is the searched grouping better than the papers' uniform ones?

For a depth of S sequential steps with pairs (P = 2), compare the untuned KL(original ‖ grouped)
of cqil's searched grouping with that of every uniform grouping in the papers' notation
(--start s --end s+2·(N−S) --group-size 2), all measured on the same calibration windows that the
search did not use.

    python -m cqil_cli.benchmarks.search_quality [--steps 24] [--samples 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    from cqil_cli.analyze.options import AnalyzeOptions
    from cqil_cli.analyze.profile import analyze_model
    from cqil_cli.calibrate.evaluate import grouping_kl
    from cqil_cli.inputs.models import load_model
    from cqil_cli.inputs.text import token_samples
    from cqil_cli.search.partitions import best_partitions, uniform_groups

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--calib", default="default")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--samples", type=int, default=8, help="analyze samples (128 tokens)")
    parser.add_argument("--kl-samples", type=int, default=8, help="KL windows (256 tokens)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    loaded = load_model(args.model)
    n = loaded.num_layers
    pairs = n - args.steps
    ids = token_samples(loaded.tokenizer, args.calib, args.samples, 128, seed=0)
    report = analyze_model(loaded, ids, AnalyzeOptions(window=2, latency=False))
    cost = report.group_costs(2)
    candidates = best_partitions(n, 2, {1: 1.0, 2: 1.0}, cost, float(args.steps), keep=4)
    kl_ids = token_samples(loaded.tokenizer, args.calib, args.kl_samples, 256, seed=1)
    rows = []
    for p in candidates:
        rows.append(("searched", p.spec(), grouping_kl(loaded.model, p.groups(), 1, kl_ids)))
    for start in range(0, n - 2 * pairs + 1):
        groups = uniform_groups(start, start + 2 * pairs, 2, n)
        spec = ",".join(f"{g[0]}-{g[-1]}" for g in groups if len(g) > 1)
        rows.append((f"uniform start={start}", spec, grouping_kl(loaded.model, groups, 1,
                                                                 kl_ids)))
    best_searched = min(r[2] for r in rows if r[0] == "searched")
    best_uniform = min(r[2] for r in rows if r[0] != "searched")
    chosen = min((r for r in rows if r[0] == "searched"), key=lambda r: r[2])
    print(f"{n} layers, {args.steps} steps ({pairs} pairs); KL on {kl_ids.numel()} tokens")
    for kind, spec, kl in sorted(rows, key=lambda r: r[2]):
        print(f"{kl:8.4f}  {kind:18s} {spec}")
    print(f"searched (chosen after re-measuring): {chosen[2]:.4f} [{chosen[1]}]; best uniform: "
          f"{best_uniform:.4f}; ratio {chosen[2] / best_uniform:.3f}")
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "best_searched": best_searched,
                       "best_uniform": best_uniform}, handle, indent=2)


if __name__ == "__main__":
    main()
