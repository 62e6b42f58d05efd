"""`cqil bench`: the click command, a thin layer over cqil_cli.bench (docs/bench.md)."""

from __future__ import annotations

import functools
import math

import click
from rich.console import Console
from rich.table import Table

from .cli import State, _nothing, _threads, check_writable, model_options, write_json_atomic
from .cli import write_png_atomic
from .errors import CqilError


@click.command("bench")
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
def bench_command(state: State, models, baseline, device, dtype, trust_remote_code,
                  allow_pickle, prompt_len, new_tokens, batch, repeats, warmup, eval_spec,
                  eval_tokens, eval_window, greedy_prompts, greedy_tokens, cqil_engine, compile_,
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
    from .bench import BenchOptions, parse_batches, plan_entries, progress_steps, \
        resolve_baseline, run_bench
    from .models import load_model, resolve_device, torch_dtype

    json_target = check_writable(json_path, "the JSON report")
    plot_target = check_writable(plot_path, "the chart")
    options = BenchOptions(
        prompt_len=prompt_len, new_tokens=new_tokens, batches=parse_batches(batch),
        repeats=repeats, warmup=warmup, eval_spec=eval_spec, eval_tokens=eval_tokens,
        eval_window=eval_window, greedy_prompts=greedy_prompts,
        greedy_prompt_len=greedy_tokens, greedy_tokens=greedy_tokens, seed=seed,
        cqil_engine=cqil_engine, compile=compile_, latency=not no_latency,
        quality=not no_quality)
    options.check()
    device = resolve_device(device)  # a device that is not there fails here, before loading
    torch_dtype(dtype)
    models = list(models)
    baseline_spec, source = resolve_baseline(models, baseline)
    _threads()

    def load(spec: str):
        with state.err.status(f"loading {spec}") if not state.quiet else _nothing():
            return load_model(spec, device=device, dtype=dtype,
                              trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    plan = plan_entries(models, baseline_spec, source, options, load)
    entries = 1 + (plan.engine_baseline is not None) + len(plan.entries)
    with state.progress() as progress:
        task = progress.add_task("benchmarking", total=progress_steps(entries, options))

        def advance(label: str) -> None:
            progress.update(task, advance=1, description=label)

        report = run_bench(plan, options, device, dtype, advance)
    bench_tables(report, state.out)
    if json_target:
        write_json_atomic(json_target, report)
        state.err.print(f"report: {json_target}")
    if plot_target:
        from .plots import tradeoff_chart

        write_png_atomic(plot_target, functools.partial(tradeoff_chart, report))
        state.err.print(f"chart: {plot_target}")


# ---------------------------------------------------------------- the table


def _num(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, fmt)


def _times(value) -> str:
    return "—" if value is None else f"×{value:.3f}"


def bench_tables(report: dict, console: Console) -> None:
    """One row per model (baseline first), latency at the first batch size, ratios to it."""
    settings = report["settings"]
    rows = [report["baseline"]] + ([report["engine_baseline"]] if report["engine_baseline"]
                                   else []) + report["results"]
    first_batch = settings["batches"][0] if settings["latency"] else None
    title = f"cqil bench on {report['device']['name']} ({report['device']['dtype']})"
    if settings["latency"]:
        title += (f" — batch {first_batch}, prompt {settings['prompt_len']}, "
                  f"{settings['new_tokens']} new tokens, p50 of {settings['repeats']} rounds")
    table = Table(title=title)
    table.add_column("model")
    table.add_column("engine")
    table.add_column("steps", justify="right")
    if settings["latency"]:
        for name in ("prefill ms", "× base", "decode ms/tok", "× base", "tok/s", "peak MB"):
            table.add_column(name, justify="right")
    if settings["quality"]:
        for name in ("ppl", "KL", "top-1", "greedy"):
            table.add_column(name, justify="right")
    for i, row in enumerate(rows):
        label = row["model"]
        if i == 0:
            label += " (baseline)"
        elif row is report["engine_baseline"]:
            label += " (baseline)"
        cells = [label, row["engine"], f"{row['num_steps']}/{row['num_layers']}"]
        if settings["latency"]:
            lat, rat = row["latency"], row["ratio_to_baseline"]
            cells += [_num(lat["prefill_ms"]["p50"], ".1f"), _times(rat["prefill"]),
                      _num(lat["decode_ms_per_token"]["p50"], ".2f"), _times(rat["decode"]),
                      _num(lat["tokens_per_s"], ".1f"), _num(lat["peak_memory"]["peak_mb"], ".0f")]
        if settings["quality"]:
            q = row["quality"]
            cells += [_num(q["ppl"], ".3f"), _num(q["kl"], ".2e"),
                      _num(q["top1_agreement"], ".3f"), _num(q["greedy_match"], ".3f")]
        table.add_row(*cells)
    console.print(table)
    if settings["latency"] and len(settings["batches"]) > 1:
        by_batch = Table(title="decode ms/token p50 (× baseline) by batch size")
        by_batch.add_column("model")
        by_batch.add_column("engine")
        for b in settings["batches"]:
            by_batch.add_column(f"batch {b}", justify="right")
        for row in rows:
            cells = [row["model"], row["engine"]]
            for lat, rat in zip(row["latency_by_batch"], row["ratio_to_baseline"]["by_batch"]):
                cells.append(f"{_num(lat['decode_ms_per_token']['p50'], '.2f')} "
                             f"({_times(rat['decode'])})")
            by_batch.add_row(*cells)
        console.print(by_batch)
    if settings["quality"]:
        console.print(f"quality on '{settings['eval_spec']}': {settings['eval_windows']} windows "
                      f"of {settings['eval_window']} tokens; greedy: {settings['greedy_prompts']}"
                      f" prompts × {settings['greedy_tokens']} tokens", style="dim")


__all__ = ["bench_command", "bench_tables", "CqilError"]
