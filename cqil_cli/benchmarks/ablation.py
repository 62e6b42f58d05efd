"""Benchmark (not a test): which tuning stages recover the most quality, at 24 and 16 steps?

For each depth (a fixed grouping, so that only the recipe differs) and each recipe — untuned,
local only, end-to-end only, local + end-to-end (docs/convert.md, "Brief distillation") —
runs `cqil convert` in its own process with the same tuning time, then prints held-out and
out-of-domain perplexity (scored as convert scores them, from each manifest) and the stages'
steps.

    python -m cqil_cli.benchmarks.ablation [--minutes 10] [--device cpu] [--depths 24,16]
        [--recipes "none;local;e2e;local,e2e"] [--work DIR] [--json PATH]

Run it on an otherwise idle machine: the number of steps in the time bound is the point.
Results: docs/quality.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from ..core.documents import read_json
from ..core.files import write_json_atomic

GROUPINGS = {  # depth (steps of the default model's 30 layers) -> grouping
    24: "12-13,14-15,17-18,20-21,22-23,26-27",  # what convert's search picks (docs/quality.md)
    16: ",".join(f"{i}-{i + 1}" for i in range(1, 29, 2)),  # what --budget 0.8 needs here
}
RECIPES = ("none", "local", "e2e", "local,e2e")


def run_one(model: str, depth: int, recipe: str, args, out: Path) -> dict:
    """One conversion; its manifest's quality and tuning stages."""
    command = [sys.executable, "-m", "cqil_cli", "--quiet", "convert", model,
               "--groups", GROUPINGS[depth], "--bypass", "1", "--tune-stages", recipe,
               "--tune-minutes", str(args.minutes if recipe != "none" else 0),
               "--device", args.device, "--out", str(out), "--force"]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    row = {"depth": depth, "recipe": recipe, "command": " ".join(command[2:]),
           "seconds": round(time.perf_counter() - began, 1), "returncode": done.returncode}
    if done.returncode:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row
    manifest = read_json(out / "manifest.json", "a manifest")
    quality, ood = manifest["quality"], manifest["quality"]["ood"]
    row.update(original=quality["ppl_original"], tuned=quality["ppl_tuned"],
               untuned=quality["ppl_untuned"], ood_original=ood["ppl_original"],
               ood_tuned=ood["ppl_tuned"], ood_untuned=ood["ppl_untuned"],
               stages=[{k: s[k] for k in ("name", "steps", "seconds", "ppl", "ppl_ood", "kept")}
                       for s in manifest["tuning"].get("stages", [])])
    return row


def print_table(rows: list[dict]) -> None:
    print("| steps | recipe | held-out (× original) | out-of-domain (× original) | stages: "
          "name steps seconds held-out kept |")
    print("|---:|---|---:|---:|---|")
    for r in rows:
        if r["returncode"]:
            print(f"| {r['depth']} | {r['recipe']} | failed: {r['error']} | | |")
            continue
        stages = "; ".join(f"{s['name']} {s['steps']} {s['seconds']:.0f}s {s['ppl']:.2f} "
                           f"{'kept' if s['kept'] else 'not kept'}" for s in r["stages"])
        print(f"| {r['depth']} | {r['recipe']} | {r['tuned']:.2f} "
              f"(+{100 * (r['tuned'] / r['original'] - 1):.1f} %) | {r['ood_tuned']:.2f} "
              f"(+{100 * (r['ood_tuned'] / r['ood_original'] - 1):.1f} %) | {stages} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--minutes", type=float, default=10.0, help="tuning time per recipe")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depths", default="24,16", help="of " + ", ".join(map(str, GROUPINGS)))
    parser.add_argument("--recipes", default=";".join(RECIPES),
                        help="--tune-stages values separated by ';'")
    parser.add_argument("--work", default="ablation-out", help="where the folders are written")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        for recipe in args.recipes.split(";"):
            out = Path(args.work) / f"q{depth}-{recipe.replace(',', '-')}"
            rows.append(run_one(args.model, depth, recipe, args, out))
            print(f"steps {depth}, {recipe}: {rows[-1].get('tuned', 'failed')} "
                  f"({rows[-1]['seconds']} s)", file=sys.stderr)
    print_table(rows)
    if args.json:
        write_json_atomic(Path(args.json), {"settings": vars(args), "rows": rows})
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
