"""`cqil analyze`: the click command over analyze.profile (docs/analyze.md)."""

from __future__ import annotations

import click

from ..analyze.options import AnalyzeOptions
from ..core.errors import CqilError
from .options import State, check_writable, loading, model_options, use_all_cores, write_outputs

DEFAULTS = AnalyzeOptions()


@click.command()
@click.argument("model")
@click.option("--calib", default="default", show_default=True, metavar="TEXT",
              help="Calibration text spec.")
@click.option("--samples", default=8, show_default=True, type=click.IntRange(min=1),
              help="Number N of calibration samples.")
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=2),
              help="Tokens L per sample; also the prompt length of the latency test.")
@click.option("--window", default=None, type=int,
              help="W: similarity for layer pairs up to W apart; sensitivity for every group of "
                   "2..W adjacent layers (cost grows with W).  [default: 4, at most the number "
                   "of layers]")
@click.option("--batch-size", default=DEFAULTS.batch_size, show_default=True, type=click.IntRange(min=1),
              help="Samples per forward pass (memory, not results).")
@click.option("--repeats", default=DEFAULTS.repeats, show_default=True, type=click.IntRange(min=1),
              help="Latency repeats after one warm-up (median reported).")
@click.option("--seed", default=0, show_default=True, help="Which calibration windows are drawn.")
@click.option("--exact-kl", is_flag=True,
              help="Sensitivity as each group's KL at the model's output (and its change of "
                   "next-token loss): the rest of the model runs after every candidate, so the "
                   "cost grows with the square of the number of layers. Default: each group's "
                   "local error at its own output, linear in layers × W.")
@click.option("--no-sensitivity", is_flag=True, help="Skip the per-group sensitivity.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@model_options
@click.option("--json", "json_path", metavar="PATH", help="Write the JSON report here.")
@click.option("--plot", "plot_path", metavar="PATH", help="Write the similarity heatmap (PNG).")
@click.pass_obj
def analyze(state: State, model, calib, samples, seq_len, window, batch_size, repeats, seed,
            exact_kl, no_sensitivity, no_latency, device, dtype, trust_remote_code, allow_pickle,
            json_path, plot_path):
    """Profile MODEL: input similarity between layers, per-layer latency, group sensitivity.

    \b
    similarity   mean cosine between the inputs of layers i and j (0 < j-i <= W), the angular
                 distance, and each layer's block influence 1 - cos(input, output)
    latency      each layer's time for a prefill of --seq-len tokens and for one decode step
                 with that cache (median of --repeats), and the time outside the layers
    sensitivity  for every group of 2..W adjacent layers made concurrent alone: its local
                 error |y - x|^2 / |x|^2 per token at its own output (x: what the layers in
                 sequence give); with --exact-kl, KL(original || grouped) per token at the
                 model's output and the change of next-token loss

    See docs/analyze.md for how to read every figure and the heatmap.
    """
    from ..analyze.profile import analyze_model, check_window, progress_steps
    from ..inputs.models import load_model
    from ..inputs.text import token_samples

    json_target = check_writable(json_path, "the JSON report")
    plot_target = check_writable(plot_path, "the heatmap")
    if window is not None and window < 2:
        raise CqilError(f"bad window {window}: it must be at least 2")
    use_all_cores()
    with loading(state, "loading model"):
        loaded = load_model(model, device=device, dtype=dtype,
                            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    num_layers = loaded.num_layers
    window = min(DEFAULTS.window, num_layers) if window is None else window
    options = AnalyzeOptions(window=window, batch_size=batch_size, repeats=repeats,
                             sensitivity=not no_sensitivity, latency=not no_latency,
                             exact_kl=exact_kl)
    check_window(window, num_layers)
    ids = token_samples(loaded.tokenizer, calib, samples, seq_len, seed)
    with state.progress() as progress:
        task = progress.add_task("analyzing", total=progress_steps(samples, options, num_layers))

        def advance(label: str) -> None:
            progress.update(task, advance=1, description=label)

        report = analyze_model(loaded, ids, options, advance)
    report.calibration = {"spec": calib, "samples": samples, "seq_len": seq_len, "seed": seed}
    from .tables import analyze_tables

    analyze_tables(report, state.out)
    from .plots import similarity_heatmap

    write_outputs(state, report, json_target, plot_target, similarity_heatmap, "heatmap")
