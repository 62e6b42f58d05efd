"""`cqil convert`: the click command over convert.pipeline (docs/convert.md)."""

from __future__ import annotations

from pathlib import Path

import click

from ..calibrate.options import LOCAL_LOSSES, LOCAL_PARAMS
from ..convert.options import (
    DEFAULT_BUDGET,
    DEFAULT_TUNE_MINUTES,
    ENGINES,
    LOCAL_STARTS,
    STRATEGIES,
    ConvertOptions,
)
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
@click.option("--engine", type=click.Choice(ENGINES), default=DEFAULTS.engine, show_default=True,
              help="What --budget is measured on: fused (cqil's engine on this one device, the "
                   "original on the same) or distributed (the distributed engine on --devices "
                   "local ranks, the original under tensor parallelism on those ranks; its "
                   "alpha-beta latency model is measured first and recorded in the manifest).")
@click.option("--budget", type=float, help="Decode latency as a fraction of the original's "
              f"on the --engine (whole model). Default when nothing else is given: "
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
@click.option("--tune-steps", type=int,
              help="Tuning steps (0: no tuning): of the end-to-end stage, and of each block in "
                   "the local stage unless --local-steps is given.")
@click.option("--tune-minutes", type=float,
              help="Tuning wall-time bound for all stages together (0: no tuning); the first "
                   f"bound reached stops. Default: {DEFAULT_TUNE_MINUTES:g} unless --tune-steps "
                   "is given.")
@click.option("--tune-stages", default=DEFAULTS.tune_stages, show_default=True,
              metavar="STAGES",
              help="Tuning stages, in order: local (each changed block trained to reproduce the "
                   "original layers' output on cached activations, block after block), e2e "
                   "(KL distillation of the whole model), local,e2e, or none.")
@click.option("--local-params", type=click.Choice(LOCAL_PARAMS), default=DEFAULTS.local_params,
              show_default=True,
              help="What the local stage trains in each block: every weight of its layers, or "
                   "LoRA (--lora-rank) merged after the block; plus the bypass weights.")
@click.option("--local-loss", type=click.Choice(LOCAL_LOSSES), default=DEFAULTS.local_loss,
              show_default=True,
              help="The local stage's loss: nmse (squared error over the energy of the original "
                   "block's change of the residual stream), or cos-nmse (nmse + 1 − cosine).")
@click.option("--local-start", type=click.Choice(LOCAL_STARTS), default=DEFAULTS.local_start,
              show_default=True,
              help="The local stage's closed-form start: each block's down projections set by "
                   "ridge least squares on the cached activations (kept only if it helps).")
@click.option("--local-share", default=DEFAULTS.local_share, show_default=True, type=float,
              help="The local stage's share of --tune-minutes when e2e follows (e2e gets the rest, "
                   "including what the local stage leaves unused).")
@click.option("--local-steps", type=int,
              help="Optimizer steps per block in the local stage (default: --tune-steps).")
@click.option("--local-windows", default=DEFAULTS.local_samples, show_default=True, type=int,
              help="Calibration windows the local stage caches, at most; under --tune-minutes "
                   "as many as fit in 3/4 of its time.")
@click.option("--lora-rank", default=DEFAULTS.lora_rank, show_default=True, type=int,
              help="LoRA rank of the end-to-end stage (and of --local-params lora), merged "
                   "before writing (0: bypass weights only).")
@click.option("--calib", default=DEFAULTS.calib, show_default=True, metavar="TEXT",
              help="Calibration text (sensitivity, search, tuning): a text spec (docs/inputs.md), "
                   "e.g. default or mix; TEXT+self[=SHARE] makes SHARE (default 0.25) of the "
                   "tuning windows text the model samples itself.")
@click.option("--eval", "eval_spec", default=DEFAULTS.eval, show_default=True, metavar="TEXT",
              help="Held-out text for the perplexities in the manifest.")
@click.option("--eval-ood", default=DEFAULTS.eval_ood, show_default=True, metavar="TEXT",
              help="Out-of-domain text, reported beside --eval ('none' to skip).")
@click.option("--eval-prompt", type=int, metavar="N",
              help="Tokens at the start of each evaluation window that are the prompt, not "
                   "scored (skip runs them through every layer). Default: half of --seq-len.")
@click.option("--seq-len", default=DEFAULTS.seq_len, show_default=True, type=int, metavar="L",
              help="Tokens per window of tuning and of the held-out and out-of-domain "
                   "perplexities.")
@click.option("--tune-windows", default=DEFAULTS.tune_samples, show_default=True, type=int,
              metavar="N", help="Calibration windows tuning draws its batches from, at most.")
@click.option("--eval-windows", default=DEFAULTS.eval_samples, show_default=True, type=int,
              metavar="N", help="Windows of --eval and of --eval-ood scored, at most.")
@click.option("--report", type=click.Path(dir_okay=False), metavar="PATH",
              help="Reuse a `cqil analyze --json` report instead of measuring sensitivity again.")
@click.option("--seed", default=DEFAULTS.seed, show_default=True,
              help="Which calibration and evaluation windows are drawn; tuning's seed.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@model_options
@click.pass_obj
def convert(state: State, model, out_dir, strategy, devices, engine, budget, speedup, steps, groups,
            start, end, parallel, bypass, tune_steps, tune_minutes, tune_stages, local_params,
            local_loss, local_start, local_share, local_steps, local_windows, lora_rank, calib,
            eval_spec,
            eval_ood, eval_prompt, seq_len, tune_windows, eval_windows, report, seed, force,
            device, dtype, trust_remote_code, allow_pickle):
    """Convert MODEL so that groups of adjacent layers run concurrently.

    \b
    The grouping comes from a search under a latency budget (--budget, --speedup, --steps;
    default --budget 0.9) on measured sensitivity and latency, or is given by hand (--groups,
    or --start/--end/--parallel). The converted model is then tuned briefly against the
    original, in two stages: each changed block reconstructed on its own (--tune-stages
    local), then the whole model by KL distillation (e2e); each stage is kept only if
    held-out perplexity improves.
    --strategy skip and prune are the comparison methods, with the same budget and tuning
    options. Held-out perplexity scores the second half of each window after the first half
    as a prompt (--eval-prompt).
    The folder loads with transformers (trust_remote_code=True, or after `import cqil_cli`)
    and holds manifest.json: grouping, placement, predictions, quality, sha256 of every file.
    See docs/convert.md.
    """
    from ..convert.pipeline import Callbacks, run_convert

    opts = ConvertOptions(out=Path(out_dir), strategy=strategy, devices=devices, engine=engine,
                          budget=budget,
                          speedup=speedup, steps=steps, groups=groups, start=start, end=end,
                          group_size=parallel, bypass=bypass, tune_steps=tune_steps,
                          tune_minutes=tune_minutes, tune_stages=tune_stages,
                          local_params=local_params, local_loss=local_loss,
                          local_start=local_start, local_share=local_share,
                          local_steps=local_steps, local_samples=local_windows,
                          lora_rank=lora_rank, calib=calib, eval=eval_spec,
                          eval_ood=None if eval_ood.lower() == "none" else eval_ood,
                          eval_prompt=eval_prompt, seq_len=seq_len, tune_samples=tune_windows,
                          eval_samples=eval_windows, report=Path(report) if report else None, seed=seed, force=force)
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
            tune_task["id"] = progress.add_task("tuning: end to end", total=total)

        def tune_step(step, loss, elapsed):
            done = step if tune_task["by_steps"] else int(elapsed)
            progress.update(tune_task["id"], completed=done,
                            description=f"tuning: end to end (step {step}, KL {loss:.4f})")

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
                    f"ms/token, {p.get('engine', 'cqil engine')})")
    state.out.print(f"held-out perplexity ({q['eval']}, tokens after a {q['prompt_tokens']}-token "
                    f"prompt): original {q['ppl_original']:.3f}, "
                    f"untuned {q['ppl_untuned']:.3f}, tuned {q['ppl_tuned']:.3f}")
    ood = q.get("ood") or {}
    if ood.get("ppl_original") is not None:
        state.out.print(f"out-of-domain perplexity ({ood['eval']}): original "
                        f"{ood['ppl_original']:.3f}, untuned {ood['ppl_untuned']:.3f}, tuned "
                        f"{ood['ppl_tuned']:.3f}")
    for stage in manifest.tuning.get("stages", []):
        ood = "" if stage["ppl_ood"] is None else f", out-of-domain {stage['ppl_ood']:.3f}"
        state.out.print(f"tuning stage {stage['name']}: {stage['steps']} steps in "
                        f"{stage['seconds']:.0f} s, held-out {stage['ppl']:.3f}{ood} "
                        f"({'kept' if stage['kept'] else 'not kept: no better'})")
    state.err.print(f"converted model: {out_dir}")


def _layer_list(layers: list[int]) -> str:
    return ",".join(str(i) for i in layers) or "none"
