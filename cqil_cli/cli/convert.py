"""`cqil convert`: the click command over convert.pipeline (docs/convert.md)."""

from __future__ import annotations

import click

from ..convert.options import GROUP, OUTPUT, TUNE, WEIGHTS, WHAT, ConvertOptions
from .declare import SectionedCommand, build, dataclass_options, global_flags
from .options import (
    WHERE,
    State,
    check_writable,
    encoding_option,
    json_option,
    model_options,
    use_all_cores,
    use_encoding,
    write_outputs,
)


@click.command(cls=SectionedCommand, sections=(WHAT, GROUP, TUNE, WEIGHTS, WHERE, OUTPUT))
@click.argument("model")
@dataclass_options(ConvertOptions)
@encoding_option(section=WHAT)
@model_options
@json_option("Also write the manifest (schema cqil.manifest) here.")
@global_flags
@click.pass_obj
def convert(state: State, model, device, dtype, trust_remote_code, allow_pickle, encoding,
            json_path, **params):
    """Convert MODEL so that groups of adjacent layers run concurrently.

    \b
    The grouping comes from a search under a latency budget (--budget, --speedup, --steps;
    default --budget 0.9) on measured sensitivity and latency, or is given by hand (--groups,
    or --start/--end with --group-size). The converted model is then tuned briefly against the
    original, in two stages: each changed block reconstructed on its own (--tune-stages
    local), then the whole model by KL distillation (e2e); each stage is kept only if
    held-out perplexity improves.
    --strategy skip and prune are the comparison methods, with the same budget and tuning
    options. Held-out perplexity scores the second half of each window after the first half
    as a prompt (--eval-prompt).
    Every option is checked before the model loads (the grouping against config.json's
    layers), the rest right after it loads, before anything is measured.
    The folder loads with transformers (trust_remote_code=True, or after `import cqil_cli`)
    and holds manifest.json: grouping, placement, predictions, quality, sha256 of every file.
    See docs/convert.md.
    """
    from ..convert.pipeline import Callbacks, check_before_loading, run_convert

    opts = build(ConvertOptions, params)
    json_target = check_writable(json_path, "the JSON manifest", ".json")
    use_encoding(encoding)
    load = dict(device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle)
    check_before_loading(model, opts, load)
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

        manifest = run_convert(model, opts, load,
                               Callbacks(status=status, progress=bar, tune_step=tune_step,
                                         tune_start=tune_start), checked=True)
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
    state.err.print(f"converted model: {opts.out}")
    if json_target:
        write_outputs(state, manifest.to_json(), json_target, None, None, "")


def _layer_list(layers: list[int]) -> str:
    return ",".join(str(i) for i in layers) or "none"
