"""`cqil bench`: the click command, a thin layer over cqil_cli.bench.measure (docs/bench.md).

cli.py registers this command at its end; import `cqil_cli.cli.app` (not this module first).
"""

from __future__ import annotations

import math

import click
from rich.console import Console
from rich.table import Table

from ..core.errors import CqilError
from .options import State, check_writable, loading, model_options, use_all_cores, write_outputs


@click.command()
@click.argument("models", nargs=-1, required=True, metavar="MODEL [MODEL...]")
@click.option("--baseline", metavar="MODEL",
              help="Compare against this model. Default: the base model named in a converted "
                   "folder's manifest (or config).")
@model_options
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(min=1),
              help="Prompt tokens of the latency test (windows of the --eval text).")
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(min=2),
              help="Tokens generated per latency run (the first belongs to the prefill).")
@click.option("--batch", "batch", default="1", show_default=True, metavar="B[,B...]",
              help="Batch sizes of the latency test, e.g. 1,4,8.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed rounds; in each, every model runs once (round-robin).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0),
              help="Untimed runs per model and batch size first (reported apart).")
@click.option("--eval", "eval_spec", default="default:heldout", show_default=True,
              metavar="TEXT", help="Held-out text for the quality test (any text spec).")
@click.option("--eval-tokens", default=8192, show_default=True, type=click.IntRange(min=2),
              help="Tokens of teacher-forced evaluation.")
@click.option("--eval-window", default=256, show_default=True, type=click.IntRange(min=2),
              help="Tokens per evaluation window.")
@click.option("--eval-prompt", type=click.IntRange(min=0), metavar="N",
              help="Leading tokens of each evaluation window that are the prompt, not scored "
                   "(default: half the window; 0 scores every token).")
@click.option("--greedy-prompts", default=16, show_default=True, type=click.IntRange(min=1),
              help="Prompts of the greedy-continuation test.")
@click.option("--greedy-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Greedy tokens generated after each prompt (its length too).")
@click.option("--cqil-engine", is_flag=True,
              help="Also run plain Llama-family checkpoints (and the baseline) on cqil's "
                   "engine, to separate the engine's gain from the grouping's.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile cqil's decode step (warm-up then includes compilation).")
@click.option("--no-quality", is_flag=True, help="Latency only.")
@click.option("--no-latency", is_flag=True, help="Quality only.")
@click.option("--seed", default=0, show_default=True, help="Which text windows are drawn.")
@click.option("--json", "json_path", metavar="PATH", help="Write the JSON report here.")
@click.option("--plot", "plot_path", metavar="PATH",
              help="Write the trade-off chart (PNG): decode latency ratio vs perplexity.")
@click.pass_obj
def bench(state: State, models, baseline, device, dtype, trust_remote_code,
                  allow_pickle, prompt_len, new_tokens, batch, repeats, warmup, eval_spec,
                  eval_tokens, eval_window, eval_prompt, greedy_prompts, greedy_tokens, cqil_engine, compile_,
                  no_quality, no_latency, seed, json_path, plot_path):
    """Latency and quality of MODEL(s) side by side with a baseline.

    \b
    MODEL is any model spec or a folder written by `cqil convert`. A plain checkpoint runs
    with transformers' generate(); a converted folder on cqil's fast engine (the report says
    which). Models are timed round-robin after a warm-up: prefill time, decode time per token
    (p50/p90/mean/stdev), tokens/s and peak memory per batch size. Quality against the
    baseline on held-out text: perplexity, KL(baseline || model) per token, top-1 agreement,
    and the share of identical greedy continuations.

    See docs/bench.md for how every number is measured, the JSON schema and the chart.
    """
    from ..bench.measure import (
        BenchOptions,
        parse_batches,
        plan_entries,
        progress_steps,
        resolve_baseline,
        run_bench,
    )
    from ..inputs.models import load_model, resolve_device, torch_dtype

    json_target = check_writable(json_path, "the JSON report")
    plot_target = check_writable(plot_path, "the chart")
    options = BenchOptions(
        prompt_len=prompt_len, new_tokens=new_tokens, batches=parse_batches(batch),
        repeats=repeats, warmup=warmup, eval_spec=eval_spec, eval_tokens=eval_tokens,
        eval_window=eval_window, eval_prompt=eval_prompt, greedy_prompts=greedy_prompts,
        greedy_prompt_len=greedy_tokens, greedy_tokens=greedy_tokens, seed=seed,
        cqil_engine=cqil_engine, compile=compile_, latency=not no_latency,
        quality=not no_quality)
    options.check()
    if plot_target and not (options.latency and options.quality):
        raise CqilError("--plot draws latency against perplexity: it needs both measurements "
                        "(drop --no-latency / --no-quality)")
    device = resolve_device(device)  # a device that is not there fails here, before loading
    torch_dtype(dtype)
    models = list(models)
    baseline_spec, source = resolve_baseline(models, baseline)
    use_all_cores()

    def load(spec: str):
        with loading(state, f"loading {spec}"):
            return load_model(spec, device=device, dtype=dtype,
                              trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    plan = plan_entries(models, baseline_spec, source, options, load)
    with state.progress() as progress:
        task = progress.add_task("benchmarking", total=progress_steps(plan, options))

        def advance(label: str) -> None:
            progress.update(task, advance=1, description=label)

        report = run_bench(plan, options, device, dtype, advance)
    bench_tables(report, state.out)
    for row in report["results"]:
        if row.get("base_weights_match") is False:
            state.err.print(f"warning: the baseline '{report['baseline']['model']}' is not the "
                            f"checkpoint '{row['model']}' was converted from (its weight files "
                            "differ from the manifest's sha256)", style="yellow")
    from .plots import tradeoff_chart

    write_outputs(state, report, json_target, plot_target, tradeoff_chart, "chart")


# ---------------------------------------------------------------- the table


def _num(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, fmt)


def _times(value) -> str:
    return "—" if value is None else f"×{value:.3f}"


def bench_tables(report: dict, console: Console) -> None:
    """One row per model (baseline first), latency at the first batch size, ratios to it.

    Latency and quality share one table on a wide terminal and get one table each otherwise.
    """
    settings = report["settings"]
    rows = [report["baseline"]] + ([report["engine_baseline"]] if report["engine_baseline"]
                                   else []) + report["results"]
    first_batch = settings["batches"][0]
    title = f"cqil bench on {report['device']['name']} ({report['device']['dtype']})"
    latency_note = (f"batch {first_batch}, prompt {settings['prompt_len']}, "
                    f"{settings['new_tokens']} new tokens, p50 of {settings['repeats']} rounds; "
                    "× = ratio to the baseline")
    latency_cols = ["prefill ms", "decode ms/tok", "tok/s", "peak MB"]
    quality_cols = ["ppl", "KL", "top-1", "greedy"]

    def label(i: int, row: dict) -> str:
        if i == 0 or row is report["engine_baseline"]:
            return f"{row['model']} (baseline)"
        return row["model"]

    def latency_cells(row: dict) -> list[str]:
        lat, rat = row["latency"], row["ratio_to_baseline"]
        return [f"{_num(lat['prefill_ms']['p50'], '.1f')} {_times(rat['prefill'])}",
                f"{_num(lat['decode_ms_per_token']['p50'], '.2f')} {_times(rat['decode'])}",
                _num(lat["tokens_per_s"], ".1f"), _num(lat["peak_memory"]["peak_mb"], ".0f")]

    def quality_cells(row: dict) -> list[str]:
        q = row["quality"]
        return [f"{_num(q['ppl'], '.3f')} {_times(row['ratio_to_baseline']['ppl'])}",
                _num(q["kl"], ".2e"), _num(q["top1_agreement"], ".3f"),
                _num(q["greedy_match"], ".3f")]

    def table(heading: str, columns: list[str], cells) -> Table:
        t = Table(title=heading)
        for name in ["model", "engine", "steps"] + columns:
            t.add_column(name, justify="left" if name in ("model", "engine") else "right")
        for i, row in enumerate(rows):
            t.add_row(label(i, row), row["engine"], f"{row['num_steps']}/{row['num_layers']}",
                      *cells(row))
        return t

    parts = []
    if settings["latency"]:
        parts.append((latency_note, latency_cols, latency_cells))
    if settings["quality"]:
        parts.append((f"quality on {settings['eval_spec']}", quality_cols, quality_cells))
    if len(parts) == 2 and console.width >= 140:
        console.print(table(f"{title}\n{latency_note}", latency_cols + quality_cols,
                            lambda row: latency_cells(row) + quality_cells(row)))
    else:
        for heading, columns, cells in parts:
            console.print(table(f"{title}: {heading}", columns, cells))
    if settings["latency"] and len(settings["batches"]) > 1:
        by_batch = Table(title="decode ms/token, p50 (ratio to the baseline), by batch size")
        by_batch.add_column("model")
        by_batch.add_column("engine")
        for b in settings["batches"]:
            by_batch.add_column(f"batch {b}", justify="right")
        for i, row in enumerate(rows):
            cells = [label(i, row), row["engine"]]
            for lat, rat in zip(row["latency_by_batch"], row["ratio_to_baseline"]["by_batch"],
                                strict=True):
                cells.append(f"{_num(lat['decode_ms_per_token']['p50'], '.2f')} "
                             f"({_times(rat['decode'])})")
            by_batch.add_row(*cells)
        console.print(by_batch)
    if settings["quality"]:
        console.print(f"quality: {settings['eval_windows']} windows of {settings['eval_window']}"
                      f" tokens of '{settings['eval_spec']}', scored after a "
                      f"{settings['eval_prompt']}-token prompt; greedy: "
                      f"{settings['greedy_prompts']} prompts, {settings['greedy_tokens']} tokens "
                      "each", style="dim")


__all__ = ["bench", "bench_tables"]
