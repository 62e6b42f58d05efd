"""Benchmark (not a test): how well analyze's default local error stands in for the KL at the
output (docs/analyze.md, "Which measure").

Reads two `cqil analyze --json` reports of the same model and samples, one made with
`--exact-kl`, and prints the Spearman correlation of their group costs (all groups, then by
size), how many of the 10 cheapest per saved step they share, and, for each depth, the summed
exact KL of the best partition by the exact costs against the best of the `--keep` partitions
the local costs put first (what convert's search would re-measure).

    cqil analyze default --exact-kl --json exact.json
    cqil analyze default --json local.json
    python -m cqil_cli.benchmarks.sensitivity_measures exact.json local.json [--steps 24,20,16]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def spearman(a: dict, b: dict) -> float:
    """Rank correlation of two {key: value} maps over their common keys (no ties expected)."""
    keys = sorted(set(a) & set(b))
    rank_a = {k: r for r, k in enumerate(sorted(keys, key=a.__getitem__))}
    rank_b = {k: r for r, k in enumerate(sorted(keys, key=b.__getitem__))}
    n = len(keys)
    return 1 - 6 * sum((rank_a[k] - rank_b[k]) ** 2 for k in keys) / (n * (n * n - 1))


def main() -> None:
    from cqil_cli.analyze.profile import AnalyzeReport
    from cqil_cli.core.documents import read_json
    from cqil_cli.search.partitions import best_partitions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exact", type=Path, help="a report of `cqil analyze --exact-kl`")
    parser.add_argument("local", type=Path, help="a report of `cqil analyze` (local error)")
    parser.add_argument("--steps", default="24,20,16", help="depths to search, comma-separated")
    parser.add_argument("--group-size", type=int, default=2, help="largest group searched")
    parser.add_argument("--keep", type=int, default=4, help="partitions re-measured by convert")
    args = parser.parse_args()
    exact = AnalyzeReport.from_json(read_json(args.exact, "the exact report"), str(args.exact))
    local = AnalyzeReport.from_json(read_json(args.local, "the local report"), str(args.local))
    widest = max(g["size"] for g in exact.groups)
    kl, err = exact.group_costs(widest), local.group_costs(widest)
    print(f"Spearman, all {len(kl)} groups: {spearman(kl, err):.3f}")
    for size in range(2, widest + 1):
        same = {k: v for k, v in kl.items() if len(k) == size}
        print(f"  groups of {size}: {spearman(same, err):.3f}")
    per_step = {k: v / (len(k) - 1) for k, v in kl.items()}
    per_step_local = {k: v / (len(k) - 1) for k, v in err.items()}
    cheapest = set(sorted(per_step, key=per_step.get)[:10])
    cheapest_local = set(sorted(per_step_local, key=per_step_local.get)[:10])
    print(f"shared among the 10 cheapest per saved step: {len(cheapest & cheapest_local)}")
    n, size = exact.num_layers, args.group_size
    latency = {s: 1.0 for s in range(1, size + 1)}
    for steps in (int(s) for s in args.steps.split(",")):
        def summed(partition):
            return sum(kl[tuple(g)] for g in partition.groups() if len(g) > 1)

        best = best_partitions(n, size, latency, exact.group_costs(size), float(steps), keep=1)
        by_local = best_partitions(n, size, latency, local.group_costs(size), float(steps),
                                   keep=args.keep)
        print(f"{steps} steps: summed exact KL {summed(best[0]):.3f} by the exact costs, "
              f"{min(summed(p) for p in by_local):.3f} best of the local costs' {args.keep}")


if __name__ == "__main__":
    main()
