"""`cqil analyze`: the click command over analyze.profile (docs/analyze.md)."""

from __future__ import annotations

import click

from ..analyze.options import AnalyzeInputs, AnalyzeOptions
from ..core.options import check_ranges
from . import options as shared
from .declare import SectionedCommand, build, dataclass_options, global_flags

MEASURE, TEXT = "What to measure", "Calibration text"


@click.command(cls=SectionedCommand, sections=(TEXT, MEASURE, shared.WHERE, shared.OUTPUT))
@click.argument("model")
@dataclass_options(AnalyzeInputs, section=TEXT)
@shared.encoding_option(section=TEXT)
@dataclass_options(AnalyzeOptions, section=MEASURE)
@shared.model_options
@shared.json_option("Write the JSON report here.")
@shared.plot_option("Write the similarity heatmap (PNG).")
@global_flags
@click.pass_obj
def analyze(state: shared.State, model, device, dtype, trust_remote_code, allow_pickle, encoding,
            json_path, plot_path, **params):
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
    from ..analyze.options import check_window
    from ..analyze.profile import analyze_model, progress_steps
    from ..inputs.models import load_model, resolve_device, torch_dtype
    from ..inputs.specs import config_facts
    from ..inputs.text import check_text_spec, token_samples

    window_given = click.get_current_context().get_parameter_source("window").name != "DEFAULT"
    inputs, options = build(AnalyzeInputs, params), build(AnalyzeOptions, params)
    check_ranges(inputs)
    check_ranges(options)
    json_target = shared.check_writable(json_path, "the JSON report", ".json")
    plot_target = shared.check_writable(plot_path, "the heatmap", ".png")
    shared.use_encoding(encoding)
    raw = shared.check_model_spec(model, allow_pickle)
    layers = config_facts(raw)[0] if raw else None
    if layers and window_given:
        check_window(options.window, layers)
    shared.check_positions(raw, inputs.seq_len, "--seq-len")
    check_text_spec(inputs.calib)
    resolve_device(device)
    torch_dtype(dtype)
    shared.use_all_cores()
    with shared.loading(state, "loading model"):
        loaded = load_model(model, device=device, dtype=dtype,
                            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    num_layers = loaded.num_layers
    if not window_given:
        options.window = min(options.window, num_layers)
    check_window(options.window, num_layers)
    shared.check_positions({"max_position_embeddings": getattr(
        loaded.model.config, "max_position_embeddings", None)}, inputs.seq_len, "--seq-len")
    samples = inputs.samples
    ids = token_samples(loaded.tokenizer, inputs.calib, samples, inputs.seq_len, inputs.seed)
    with state.progress() as progress:
        task = progress.add_task("analyzing", total=progress_steps(samples, options, num_layers))

        def advance(label: str) -> None:
            progress.update(task, advance=1, description=label)

        report = analyze_model(loaded, ids, options, advance)
    report.calibration = {"spec": inputs.calib, "samples": samples, "seq_len": inputs.seq_len,
                          "seed": inputs.seed}
    from .tables import analyze_tables

    analyze_tables(report, state.out)
    from .plots import similarity_heatmap

    shared.write_outputs(state, report, json_target, plot_target, similarity_heatmap, "heatmap")
