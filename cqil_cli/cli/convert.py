"""`cqil convert`: the click command over convert.pipeline (docs/convert.md)."""

from __future__ import annotations

from pathlib import Path

import click

from ..convert.options import DEFAULT_BUDGET, DEFAULT_TUNE_MINUTES, STRATEGIES, ConvertOptions
from .options import State, model_options, use_all_cores

DEFAULTS = ConvertOptions(out=Path("."))


@click.command()
@click.argument("model")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Folder to write.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=DEFAULTS.strategy,
              show_default=True,
              help="cqil: concurrent groups of adjacent layers with a learned bypass; skip: "
                   "Unified Layer Skipping (the prompt runs through every layer, generated "
                   "tokens through evenly spaced ones; --speedup R uses the paper's rule); "
                   "prune: remove the layers of lowest block influence (ShortGPT), a plain model.")
@click.option("--devices", default=DEFAULTS.devices, show_default=True, type=int,
              help="P: the largest group, and the number of ranks in the placement.")
@click.option("--budget", type=float, help="Decode latency as a fraction of the original's "
              f"on this device (cqil's engine, whole model). Default when nothing else is given: "
              f"{DEFAULT_BUDGET}.")
@click.option("--speedup", type=float, help="Decode speed-up instead of --budget (1/budget).")
@click.option("--steps", type=int, help="Number of sequential steps instead of a budget.")
@click.option("--groups", metavar="SPEC", help="Groups by hand: 14-15,16-17 (inclusive ranges; "
              "other layers stay single) or none.")
@click.option("--start", type=int, help="The papers' notation: first grouped layer (0-based) ...")
@click.option("--end", type=int, help="... end of the grouped range (exclusive) ...")
@click.option("--parallel", type=int, help="... and the group size: consecutive groups of this many layers (at most "
                   "--devices).")
@click.option("--bypass", default=DEFAULTS.bypass, show_default=True, type=int,
              help="Bypass distance D: each layer's MLP also sees the attention of the D layers "
                   "before it in its group (0: none).")
@click.option("--tune-steps", type=int, help="Tuning (distillation) steps (0: no tuning).")
@click.option("--tune-minutes", type=float,
              help="Tuning wall-time bound (0: no tuning); the first bound reached stops. "
                   f"Default: {DEFAULT_TUNE_MINUTES:g} unless --tune-steps is given.")
@click.option("--lora-rank", default=DEFAULTS.lora_rank, show_default=True, type=int,
              help="LoRA rank on the grouped layers, merged before writing (0: bypass weights only).")
@click.option("--calib", default=DEFAULTS.calib, show_default=True, metavar="TEXT",
              help="Calibration text (sensitivity, search, tuning).")
@click.option("--eval", "eval_spec", default=DEFAULTS.eval, show_default=True, metavar="TEXT",
              help="Held-out text for the perplexities in the manifest.")
@click.option("--eval-ood", default=DEFAULTS.eval_ood, show_default=True, metavar="TEXT",
              help="Out-of-domain text, reported beside --eval ('none' to skip).")
@click.option("--eval-prompt", type=int, metavar="N",
              help=f"Tokens at the start of each {DEFAULTS.seq_len}-token evaluation window that are the "
                   "prompt, not scored (skip runs them through every layer). Default: half.")
@click.option("--report", type=click.Path(dir_okay=False), metavar="PATH",
              help="Reuse a `cqil analyze --json` report instead of measuring sensitivity again.")
@click.option("--seed", default=DEFAULTS.seed, show_default=True,
              help="Which calibration and evaluation windows are drawn; tuning's seed.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@model_options
@click.pass_obj
def convert(state: State, model, out_dir, strategy, devices, budget, speedup, steps, groups,
            start, end, parallel, bypass, tune_steps, tune_minutes, lora_rank, calib, eval_spec,
            eval_ood, eval_prompt, report, seed, force, device, dtype, trust_remote_code,
            allow_pickle):
    """Convert MODEL so that groups of adjacent layers run concurrently.

    \b
    The grouping comes from a search under a latency budget (--budget, --speedup, --steps;
    default --budget 0.9) on measured sensitivity and latency, or is given by hand (--groups,
    or --start/--end/--parallel). The bypass weights (and LoRA, merged) are then tuned
    briefly by distillation from the original; the tuned model is kept only if held-out
    perplexity improves.
    --strategy skip and prune are the comparison methods, with the same budget and tuning
    options. Held-out perplexity scores the second half of each window after the first half
    as a prompt (--eval-prompt).
    The folder loads with transformers (trust_remote_code=True, or after `import cqil_cli`)
    and holds manifest.json: grouping, placement, predictions, quality, sha256 of every file.
    See docs/convert.md.
    """
    from ..convert.pipeline import Callbacks, run_convert

    opts = ConvertOptions(out=Path(out_dir), strategy=strategy, devices=devices, budget=budget,
                          speedup=speedup, steps=steps, groups=groups, start=start, end=end,
                          group_size=parallel, bypass=bypass, tune_steps=tune_steps,
                          tune_minutes=tune_minutes, lora_rank=lora_rank, calib=calib, eval=eval_spec,
                          eval_ood=None if eval_ood.lower() == "none" else eval_ood,
                          eval_prompt=eval_prompt,
                          report=Path(report) if report else None, seed=seed, force=force)
    use_all_cores()
    with state.progress() as progress:
        def status(text):
            progress.console.print(f"[dim]{text}[/dim]")

        def bar(label, total):
            task = progress.add_task(label, total=total)
            return lambda: progress.update(task, advance=1)

        tune_task = {}

        def tune_start(steps_bound, minutes_bound):
            total = steps_bound if steps_bound else int((minutes_bound or 0) * 60)
            tune_task["by_steps"] = bool(steps_bound)
            tune_task["id"] = progress.add_task("tuning", total=total)

        def tune_step(step, loss, elapsed):
            done = step if tune_task["by_steps"] else int(elapsed)
            progress.update(tune_task["id"], completed=done,
                            description=f"tuning (step {step}, KL {loss:.4f})")

        manifest = run_convert(model, opts, dict(device=device, dtype=dtype,
                                                 trust_remote_code=trust_remote_code,
                                                 allow_pickle=allow_pickle),
                               Callbacks(status=status, progress=bar, tune_step=tune_step,
                                         tune_start=tune_start))
    q, p = manifest.quality, manifest.predicted
    grouped = [f"{g[0]}-{g[-1]}" for g in manifest.steps if len(g) > 1]
    depth = f"{manifest.num_steps} steps of {manifest.num_layers} layers"
    if manifest.strategy == "skip":
        state.out.print(f"skipped when decoding: {_layer_list(manifest.skipped_layers)}  ({depth}; "
                        "the prompt runs through every layer)")
    elif manifest.strategy == "prune":
        state.out.print(f"removed: {_layer_list(manifest.removed_layers)}  ({depth})")
    else:
        state.out.print(f"groups: {','.join(grouped) or 'none'}  ({depth}, "
                        f"bypass {manifest.bypass_distance})")
    if "measured_kl" in manifest.grouping:
        state.out.print(f"measured KL of the chosen grouping (untuned): "
                        f"{manifest.grouping['measured_kl']:.4f}")
    state.out.print(f"predicted decode latency: {p['latency_ratio']:.3f} × the original "
                    f"({p['decode_ms_per_token']:.2f} vs {p['original_decode_ms_per_token']:.2f} "
                    "ms/token, cqil engine)")
    state.out.print(f"held-out perplexity ({q['eval']}, tokens after a {q['prompt_tokens']}-token "
                    f"prompt): original {q['ppl_original']:.3f}, "
                    f"untuned {q['ppl_untuned']:.3f}, tuned {q['ppl_tuned']:.3f}")
    ood = q.get("ood") or {}
    if ood.get("ppl_original") is not None:
        state.out.print(f"out-of-domain perplexity ({ood['eval']}): original "
                        f"{ood['ppl_original']:.3f}, untuned {ood['ppl_untuned']:.3f}, tuned "
                        f"{ood['ppl_tuned']:.3f}")
    state.err.print(f"converted model: {out_dir}")


def _layer_list(layers: list[int]) -> str:
    return ",".join(str(i) for i in layers) or "none"
