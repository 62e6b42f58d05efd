"""`cqil bench`: the click command over cqil_cli/bench (docs/bench.md): options ->
BenchOptions -> plan_entries -> run_bench -> tables, chart and JSON.

app.py registers this command; import `cqil_cli.cli.app` (not this module first).
"""

from __future__ import annotations

import click

from ..bench.options import LATENCY, MODELS, QUALITY, BenchOptions
from ..core.errors import CqilError
from . import options as shared
from .declare import CqilOption, SectionedCommand, build, dataclass_options, global_flags
from .tables import bench_tables


@click.command(cls=SectionedCommand, sections=(MODELS, LATENCY, QUALITY, shared.WHERE, shared.OUTPUT))
@click.argument("models", nargs=-1, required=True, metavar="MODEL [MODEL...]")
@click.option("--baseline", metavar="MODEL", cls=CqilOption, section=MODELS,
              help="Compare against this model. Default: the base model named in a converted "
                   "folder's manifest (or config).")
@dataclass_options(BenchOptions)
@shared.encoding_option(section=QUALITY)
@shared.model_options(dtype_help="float32, bfloat16 or float16; several, comma-separated "
                      "(float32,bfloat16), time and evaluate every MODEL in each (the baseline "
                      "in the first). A quantized folder's linears stay int8/int4 in each.")
@shared.json_option("Write the JSON report here.")
@shared.plot_option("Write the trade-off chart (PNG): decode latency ratio vs perplexity.")
@global_flags
@click.pass_obj
def bench(state: shared.State, models, baseline, device, dtype, trust_remote_code, allow_pickle,
          encoding, json_path, plot_path, **params):
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
    from ..bench.plan import plan_entries
    from ..bench.run import progress_steps, run_bench
    from ..inputs.models import load_model, resolve_device, torch_dtype
    from ..inputs.text import check_text_spec

    options = build(BenchOptions, params)
    options.greedy_prompt_len = options.greedy_tokens
    options.check()
    json_target = shared.check_writable(json_path, "the JSON report", ".json")
    plot_target = shared.check_writable(plot_path, "the chart", ".png")
    devices = options.devices
    if plot_target and not (options.latency and options.quality):
        raise CqilError("--plot draws latency against perplexity: it needs both measurements "
                        "(drop --no-latency / --no-quality)")
    shared.use_encoding(encoding)
    for spec in [*models, *([baseline] if baseline else [])]:
        raw = shared.check_model_spec(spec, allow_pickle)
        shared.check_positions(raw, options.prompt_len + options.new_tokens,
                        "--prompt-len + --new-tokens")
        shared.check_positions(raw, options.eval_window, "--eval-window")
    check_text_spec(options.eval_spec)
    device = resolve_device(device)  # a device that is not there fails here, before loading
    dtypes = tuple(d.strip() for d in dtype.split(","))
    for d in dtypes:
        torch_dtype(d)
    if len(set(dtypes)) != len(dtypes):
        raise CqilError(f"--dtype {dtype}: a dtype is named twice")
    if len(dtypes) > 1 and devices > 1:
        raise CqilError("--ranks W times the models in one dtype: give --dtype a single value")
    models = list(models)
    baseline_spec, source = resolve_baseline(models, baseline)
    ranks_on = "cpu"
    if devices > 1:
        from ..inputs.ranks import check_world_size

        ranks_on = shared.rank_device(device, devices)
        for spec in [baseline_spec, *models]:
            note = check_world_size(spec, devices, trust_remote_code)
            if note:
                state.err.print(f"note: {note}", markup=False, highlight=False)
    shared.use_all_cores()

    def load(spec: str, dtype: str):
        with shared.loading(state, f"loading {spec}" + (f" ({dtype})" if len(dtypes) > 1 else "")):
            return load_model(spec, device=device, dtype=dtype,
                              trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    plan = plan_entries(models, baseline_spec, source, options, load, dtypes)
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

    shared.write_outputs(state, report, json_target, plot_target, tradeoff_chart, "chart")
