"""`cqil bench`: the click command over cqil_cli/bench (docs/bench.md): options ->
BenchOptions -> plan_entries -> run_bench -> tables, chart and JSON.

app.py registers this command; import `cqil_cli.cli.app` (not this module first).
"""

from __future__ import annotations

import click

from ..bench.options import BenchOptions
from ..core.errors import CqilError
from .options import (
    State,
    check_writable,
    loading,
    model_options,
    rank_device,
    use_all_cores,
    write_outputs,
)
from .tables import bench_tables

DEFAULTS = BenchOptions()


@click.command()
@click.argument("models", nargs=-1, required=True, metavar="MODEL [MODEL...]")
@click.option("--baseline", metavar="MODEL",
              help="Compare against this model. Default: the base model named in a converted "
                   "folder's manifest (or config).")
@model_options
@click.option("--prompt-len", default=DEFAULTS.prompt_len, show_default=True, type=click.IntRange(min=1),
              help="Prompt tokens of the latency test (windows of the --eval text).")
@click.option("--new-tokens", default=DEFAULTS.new_tokens, show_default=True, type=click.IntRange(min=2),
              help="Tokens generated per latency run (the first belongs to the prefill).")
@click.option("--batch", "batch", default=",".join(map(str, DEFAULTS.batches)), show_default=True, metavar="B[,B...]",
              help="Batch sizes of the latency test, e.g. 1,4,8.")
@click.option("--repeats", default=DEFAULTS.repeats, show_default=True, type=click.IntRange(min=1),
              help="Timed rounds; in each, every model runs once (round-robin).")
@click.option("--warmup", default=DEFAULTS.warmup, show_default=True, type=click.IntRange(min=0),
              help="Untimed runs per model and batch size first (reported apart).")
@click.option("--eval", "eval_spec", default=DEFAULTS.eval_spec, show_default=True,
              metavar="TEXT", help="Held-out text for the quality test (any text spec).")
@click.option("--eval-tokens", default=DEFAULTS.eval_tokens, show_default=True, type=click.IntRange(min=2),
              help="Tokens of teacher-forced evaluation.")
@click.option("--eval-window", default=DEFAULTS.eval_window, show_default=True, type=click.IntRange(min=2),
              help="Tokens per evaluation window.")
@click.option("--eval-prompt", type=click.IntRange(min=0), metavar="N",
              help="Leading tokens of each evaluation window that are the prompt, not scored "
                   "(default: half the window; 0 scores every token).")
@click.option("--greedy-prompts", default=DEFAULTS.greedy_prompts, show_default=True, type=click.IntRange(min=1),
              help="Prompts of the greedy-continuation test.")
@click.option("--greedy-tokens", default=DEFAULTS.greedy_tokens, show_default=True, type=click.IntRange(min=1),
              help="Greedy tokens generated after each prompt (its length too).")
@click.option("--cqil-engine", is_flag=True,
              help="Also run plain checkpoints of the families cqil converts (and the "
                   "baseline) on cqil's engine, to separate the engine's gain from the "
                   "grouping's.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile cqil's decode step (warm-up then includes compilation).")
@click.option("--devices", default=1, show_default=True, type=click.IntRange(min=1),
              help="W > 1: also time the baseline and every MODEL on W local ranks of cqil's "
                   "distributed engine (the original under tensor parallelism), with each "
                   "rank's weight bytes and peak memory.")
@click.option("--no-quality", is_flag=True, help="Latency only.")
@click.option("--no-latency", is_flag=True, help="Quality only.")
@click.option("--seed", default=DEFAULTS.seed, show_default=True, help="Which text windows are drawn.")
@click.option("--json", "json_path", metavar="PATH", help="Write the JSON report here.")
@click.option("--plot", "plot_path", metavar="PATH",
              help="Write the trade-off chart (PNG): decode latency ratio vs perplexity.")
@click.pass_obj
def bench(state: State, models, baseline, device, dtype, trust_remote_code, allow_pickle,
          prompt_len, new_tokens, batch, repeats, warmup, eval_spec, eval_tokens, eval_window,
          eval_prompt, greedy_prompts, greedy_tokens, cqil_engine, compile_, devices, no_quality,
          no_latency, seed, json_path, plot_path):
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
    from ..bench.baseline import resolve_baseline
    from ..bench.options import parse_batches
    from ..bench.plan import plan_entries
    from ..bench.run import progress_steps, run_bench
    from ..inputs.models import load_model, resolve_device, torch_dtype

    json_target = check_writable(json_path, "the JSON report")
    plot_target = check_writable(plot_path, "the chart")
    options = BenchOptions(
        prompt_len=prompt_len, new_tokens=new_tokens, batches=parse_batches(batch),
        repeats=repeats, warmup=warmup, eval_spec=eval_spec, eval_tokens=eval_tokens,
        eval_window=eval_window, eval_prompt=eval_prompt, greedy_prompts=greedy_prompts,
        greedy_prompt_len=greedy_tokens, greedy_tokens=greedy_tokens, seed=seed,
        cqil_engine=cqil_engine, compile=compile_, latency=not no_latency,
        quality=not no_quality, devices=devices)
    options.check()
    if plot_target and not (options.latency and options.quality):
        raise CqilError("--plot draws latency against perplexity: it needs both measurements "
                        "(drop --no-latency / --no-quality)")
    device = resolve_device(device)  # a device that is not there fails here, before loading
    torch_dtype(dtype)
    models = list(models)
    baseline_spec, source = resolve_baseline(models, baseline)
    ranks_on = "cpu"
    if devices > 1:
        from ..inputs.ranks import check_world_size

        ranks_on = rank_device(device, devices)
        for spec in [baseline_spec, *models]:
            note = check_world_size(spec, devices, trust_remote_code)
            if note:
                state.err.print(f"note: {note}", markup=False, highlight=False)
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

        report = run_bench(plan, options, device, dtype, advance, ranks_on,
                           {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle})
    bench_tables(report, state.out)
    for row in report.results:
        if row.get("base_weights_match") is False:
            state.err.print(f"warning: the baseline '{report.baseline['model']}' is not the "
                            f"checkpoint '{row['model']}' was converted from (its weight files "
                            "differ from the manifest's sha256)", style="yellow")
    from .plots import tradeoff_chart

    write_outputs(state, report, json_target, plot_target, tradeoff_chart, "chart")
