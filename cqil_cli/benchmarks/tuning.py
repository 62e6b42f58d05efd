"""Benchmark (not a test): which tuning settings recover the most quality per minute?

Fixes a grouping (default: the 24-step grouping convert's search picks for the default model,
bypass 1) and tunes it once per setting for the same wall time, then reports held-out and
out-of-domain perplexity, scored after a 128-token prompt as `cqil convert` does. Settings
differ in learning rates, window length, batch size, LoRA rank and calibration text: the
default Shakespeare split, `default:mix` (+ Milton), or 128 windows the original model samples
itself (top-k 50 from 4-token starts of the calibration text), alone or half and half with
Shakespeare.

    python -m cqil_cli.benchmarks.tuning [--minutes 2] [--groups SPEC] [--only NAME,...] [--json PATH]

Run it on an otherwise idle machine: the number of steps in the time bound is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import torch

GROUPS = "12-13,14-15,17-18,20-21,22-23,26-27"
SETTINGS = {  # name -> (TuneOptions overrides, calibration window length, calibration text)
    "default": ({}, 256, "default"),
    "lora-lr-3e-3": ({"lr_lora": 3e-3}, 256, "default"),
    "lora-lr-3e-3-bypass-lr-1e-2": ({"lr_lora": 3e-3, "lr_bypass": 1e-2}, 256, "default"),
    "window-128-batch-8": ({"batch_size": 8}, 128, "default"),
    "rank-32": ({"lora_rank": 32}, 256, "default"),
    "bypass-only": ({"lora_rank": 0}, 256, "default"),
    "calib-mix": ({}, 256, "default:mix"),
    "calib-generated-mix": ({}, 256, "generated+default"),
    "calib-generated": ({}, 256, "generated"),
}


def self_generated(base, tokenizer, count: int = 128, length: int = 256) -> torch.Tensor:
    """count windows [count, length] sampled from the model itself (top-k 50, temperature 1),
    each from a 4-token start drawn from the calibration text."""
    from cqil_cli.inputs.text import token_samples_up_to
    from cqil_cli.runtime.fastgen import FastGenerator

    generator = FastGenerator(base)
    starts = token_samples_up_to(tokenizer, "default", count, 8, seed=7)[:, :4]
    out = [generator.generate(starts[i:i + 16], max_new_tokens=length - 4, do_sample=True,
                              top_k=50, seed=i).sequences for i in range(0, count, 16)]
    return torch.cat(out)


def main() -> None:
    from cqil_cli.calibrate.evaluate import perplexity
    from cqil_cli.calibrate.tuning import TuneOptions, tune_groups
    from cqil_cli.inputs.models import load_model
    from cqil_cli.inputs.text import token_samples_up_to
    from cqil_cli.runtime.checkpoint import build_cqil_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--groups", default=GROUPS)
    parser.add_argument("--only", help="comma-separated setting names (default: all)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    loaded = load_model("default")
    base, tok = loaded.model, loaded.tokenizer
    eval_ids = token_samples_up_to(tok, "default:heldout", 16, 256, 0, min_samples=2)
    ood_ids = token_samples_up_to(tok, "default:ood", 16, 256, 0, min_samples=2)
    p = 128
    rows = {"original": {"heldout": perplexity(base, eval_ids, prompt_tokens=p),
                         "ood": perplexity(base, ood_ids, prompt_tokens=p)}}
    names = args.only.split(",") if args.only else list(SETTINGS)
    calib = {}
    for name in names:
        overrides, seq_len, text = SETTINGS[name]
        if (text, seq_len) not in calib:
            if text.startswith("generated") and "generated" not in calib:
                calib["generated"] = self_generated(base, tok)  # sampled once, ~4 min on 2 cores
            if text == "generated":
                ids = calib["generated"]
            elif text == "generated+default":
                ids = torch.cat([token_samples_up_to(tok, "default", 128, 256, 0), calib["generated"]])
            else:
                ids = token_samples_up_to(tok, text, 256 * 256 // seq_len, seq_len, 0)
            calib[text, seq_len] = ids
        model = build_cqil_model(base, args.groups, 1)
        options = replace(TuneOptions(minutes=args.minutes, steps=None), **overrides)
        started = time.perf_counter()
        result = tune_groups(model, calib[text, seq_len], options)
        model.set_engine("reference")  # LoRA attached: evaluate through the adapters
        rows[name] = {"steps": result.steps, "seconds": round(time.perf_counter() - started, 1),
                      "heldout": perplexity(model, eval_ids, prompt_tokens=p),
                      "ood": perplexity(model, ood_ids, prompt_tokens=p),
                      "final_loss": result.losses[-1] if result.losses else None}
        del model
        print(f"{name:30s} {rows[name]['steps']:4d} steps  held-out {rows[name]['heldout']:.2f}  "
              f"ood {rows[name]['ood']:.2f}", flush=True)
    orig = rows["original"]
    print(f"\n{'setting':30s} {'steps':>5s} {'held-out':>9s} {'ood':>8s}   (original {orig['heldout']:.2f} / "
          f"{orig['ood']:.2f}; {args.minutes} min each; groups {args.groups})")
    for name in names:
        r = rows[name]
        print(f"{name:30s} {r['steps']:5d} {r['heldout']:9.2f} {r['ood']:8.2f}   "
              f"(+{100 * (r['heldout'] / orig['heldout'] - 1):.1f} % / +{100 * (r['ood'] / orig['ood'] - 1):.1f} %)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"minutes": args.minutes, "groups": args.groups, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
