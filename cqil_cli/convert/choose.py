"""Which steps a conversion keeps: the grouping of cqil, the kept layers of skip and prune.

cqil   by hand (--groups, or the papers' --start/--end/--group-size), or searched under a latency
       budget (search/partitions.py) on analyze's group sensitivity and the latency model, the
       few best partitions re-measured whole on calibration text (docs/convert.md);
skip   Unified Layer Skipping's rule (convert/strategies.py) for --speedup, or evenly spaced
       layers for a depth or budget;
prune  the layers of highest block influence (ShortGPT).
Each returns the steps (or kept layers) and a record of how they were chosen for the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..analyze.options import AnalyzeOptions
from ..core.documents import read_json
from ..core.errors import CqilError
from .options import SENSITIVITY_SAMPLE_TOKENS, ConvertOptions, check_analysis_file


@dataclass
class Callbacks:
    status: Callable[[str], None] = lambda text: None
    progress: Callable[[str, int], Callable[[], None]] = lambda label, total: (lambda: None)
    tune_step: Callable[[int, float, float], None] | None = None
    tune_start: Callable[[int | None, float | None], None] = lambda steps, minutes: None


def load_report(path: Path, num_layers: int, group_size: int):
    """The AnalyzeReport of --analysis, checked against the model and --group-size."""
    from ..analyze.profile import AnalyzeReport

    check_analysis_file(path, num_layers, group_size)
    return AnalyzeReport.from_json(read_json(path, "the --analysis"), f"--analysis {path}")


def _measure_report(loaded, opts: ConvertOptions, options: AnalyzeOptions, label: str,
                    cb: Callbacks):
    """Run analyze's measurements on calibration windows (analyze's --seq-len default)."""
    from ..analyze.profile import analyze_model, progress_steps
    from ..inputs.text import token_samples_up_to

    ids = token_samples_up_to(loaded.tokenizer, opts.calib_text, opts.calib_samples,
                              SENSITIVITY_SAMPLE_TOKENS, opts.seed)
    tick = cb.progress(label, progress_steps(len(ids), options, loaded.num_layers))
    return analyze_model(loaded, ids, options, lambda _label: tick())


def search_steps(loaded, opts: ConvertOptions, fraction: float | None, latency, cb: Callbacks):
    """(steps, details) for the cqil strategy: the best partition under the budget or depth."""
    from ..calibrate.evaluate import grouping_kl
    from ..inputs.text import token_samples_up_to
    from ..search.partitions import best_partitions, fastest_latency

    n = loaded.num_layers
    if opts.analysis is not None:
        report = load_report(opts.analysis, n, opts.group_size)
        cb.status(f"sensitivity from {opts.analysis}")
    else:
        report = _measure_report(loaded, opts, AnalyzeOptions(window=max(2, opts.group_size),
                                                              latency=False), "sensitivity", cb)
    cost = report.group_costs(opts.group_size)
    if opts.steps is not None:
        if not 1 <= opts.steps <= n:
            raise CqilError(f"bad --steps {opts.steps}: between 1 and {n}")
        step_latency = {s: 1.0 for s in range(1, opts.group_size + 1)}
        allowance = float(opts.steps)
    else:
        step_latency = {s: latency.step_ms[s] for s in range(1, opts.group_size + 1)
                        if s in latency.step_ms}
        allowance = fraction * latency.original_ms - latency.outside_ms
        if allowance <= 0:
            raise CqilError(f"the budget {fraction:.3f} is below the time outside the layers "
                            f"({latency.outside_ms / latency.original_ms:.3f} of the original)")
    try:
        candidates = best_partitions(n, opts.group_size, step_latency, cost, allowance,
                                     keep=opts.candidates)
    except CqilError as exc:
        if opts.steps is not None:
            raise CqilError(f"--steps {opts.steps} cannot be met with groups of at most "
                            f"{opts.group_size} layers: the fewest is "
                            f"{-(-n // opts.group_size)}") from exc
        sizes = [s for s in range(1, opts.group_size + 1) if s in latency.step_ms]
        fastest = latency.outside_ms + fastest_latency(n, sizes, latency.step_ms)
        raise CqilError(f"the budget {fraction:.3f} cannot be met with groups of at most "
                        f"{opts.group_size} layers: the best reachable is "
                        f"{fastest / latency.original_ms:.3f} of the original decode latency"
                        ) from exc
    ids = token_samples_up_to(loaded.tokenizer, opts.calib_text, 4, opts.window_len, opts.seed + 1)
    tick = cb.progress("re-measuring the best groupings", len(candidates))
    measured = []
    for p in candidates:
        measured.append((grouping_kl(loaded.model, p.groups(), opts.bypass, ids), p))
        tick()
    measured.sort(key=lambda pair: pair[0])
    kl, best = measured[0]
    details = {
        # predicted_cost_sum: the summed group costs of the report's sensitivity_measure
        "candidates": [{"groups": p.spec(), "predicted_cost_sum": p.cost, "measured_kl": k,
                        "steps": p.num_steps} for k, p in measured],
        "measured_kl": kl,
        "sensitivity_source": str(opts.analysis) if opts.analysis else "computed",
        "sensitivity_measure": report.sensitivity_measure,
    }
    return best.groups(), details


def cqil_steps(loaded, opts: ConvertOptions, fraction, latency, cb: Callbacks):
    from ..runtime.checkpoint import parse_groups
    from ..search.partitions import uniform_groups

    n = loaded.num_layers
    if opts.groups is not None:
        try:
            groups = parse_groups(opts.groups, n)
        except ValueError as exc:
            raise CqilError(f"bad --groups: {exc}") from exc
        return groups, {"source": "manual"}
    if opts.start is not None or opts.end is not None:
        if None in (opts.start, opts.end):
            raise CqilError("--start and --end go together")
        return uniform_groups(opts.start, opts.end, opts.group_size, n), {"source": "manual"}
    groups, details = search_steps(loaded, opts, fraction, latency, cb)
    return groups, {"source": "search", **details}


def kept_count(opts: ConvertOptions, fraction: float | None, latency, n: int) -> int:
    """How many layers a depth strategy (prune, skip) keeps for --steps or the budget."""
    if opts.steps is not None:
        keep = opts.steps
    else:
        per_layer = latency.step_ms[1]
        keep = math.floor((fraction * latency.original_ms - latency.outside_ms) / per_layer + 1e-9)
        if keep < 1:
            raise CqilError(f"the budget {fraction:.3f} cannot be met by {opts.strategy}: even one "
                            f"layer needs {(latency.outside_ms + per_layer) / latency.original_ms:.3f}")
    if not 1 <= keep <= n:
        raise CqilError(f"cannot keep {keep} of {n} layers")
    return keep


def block_influence(loaded, opts: ConvertOptions, cb: Callbacks) -> list[float]:
    """Each layer's 1 − cos(input, output), from --analysis or measured on calibration text."""
    if opts.analysis is not None:
        return load_report(opts.analysis, loaded.num_layers, 1).block_influence
    options = AnalyzeOptions(window=2, latency=False, sensitivity=False)
    return _measure_report(loaded, opts, options, "block influence", cb).block_influence




def skip_kept_layers_of(opts: ConvertOptions, fraction, latency, n: int) -> tuple[list[int], dict]:
    """(kept layers, selection record) of Unified Layer Skipping."""
    from .strategies import skip_kept_layers, skip_kept_layers_for_count

    if opts.speedup is not None:  # the paper's rule for a speed-up ratio r
        kept = skip_kept_layers(n, opts.speedup)
    else:
        kept = skip_kept_layers_for_count(n, kept_count(opts, fraction, latency, n))
    return kept, {"source": "unified layer skipping",
                  "speedup": opts.speedup if opts.speedup is not None else n / len(kept)}


def prune_kept_layers_of(loaded, opts: ConvertOptions, fraction, latency,
                         cb: Callbacks) -> tuple[list[int], dict]:
    """(kept layers, selection record) of ShortGPT pruning."""
    from .strategies import prune_kept_layers

    influence = block_influence(loaded, opts, cb)
    kept = prune_kept_layers(influence, kept_count(opts, fraction, latency, loaded.num_layers))
    return kept, {"source": "block influence", "block_influence": influence}


def measure_latency(loaded, opts: ConvertOptions, cb: Callbacks):
    """(LatencyModel the budget search reads, ParallelLatencyModel or None).

    --engine fused (the default): measured on this device with cqil's one-device engine
    (search/latency_model.py), budgets relative to the original there (with --weights, the
    original quantized in that format: convert/weights.py scheme_of). --engine distributed:
    the alpha-beta model of the distributed engine measured on --group-size local ranks
    (search/parallel_probe.py), so that a budget is a fraction of the original's
    tensor-parallel latency on those ranks (search/parallel_latency.py: search_latency).
    """
    from ..search.latency_model import measure_latency_model
    from .weights import scheme_of

    max_group = opts.group_size if opts.strategy == "cqil" else 1
    if opts.engine != "distributed":
        tick = cb.progress("measuring latency", 3 * max_group)
        weights = scheme_of(opts) if opts.weights else None
        return measure_latency_model(loaded.model, max_group, on_progress=tick, weights=weights), None
    from ..runtime.configuration_cqil import CqilConfig
    from ..search.parallel_latency import search_latency
    from ..search.parallel_probe import measure_parallel_model

    config = CqilConfig.from_base_config(loaded.model.config, None)
    cb.status(f"measuring the distributed engine on {opts.group_size} local ranks")
    parallel = measure_parallel_model(config, opts.group_size, dtype=_dtype_name(loaded.model))
    return search_latency(parallel, loaded.num_layers, opts.group_size, opts.bypass,
                          max_group_size=max_group), parallel


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def predicted_record(latency, parallel, steps: list[list[int]], bypass: int, devices: int,
                     num_layers: int) -> dict:
    """The manifest's `predicted`: the chosen steps' decode latency against the original's on
    the engine the budget used (docs/convert.md, "manifest"), and with --engine distributed the
    alpha-beta model's record on --group-size ranks."""
    predicted_ms = latency.predict_ms(steps)
    ratio = predicted_ms / latency.original_ms
    record = {"latency_ratio": ratio, "decode_ms_per_token": predicted_ms,
              "original_decode_ms_per_token": latency.original_ms,
              "step_depth_ratio": len(steps) / num_layers,
              "by_devices": {str(devices): ratio},
              "latency_model": latency.to_json(),
              "engine": "cqil fused (one device)"}
    if parallel is not None:
        record["engine"] = f"cqil distributed ({devices} ranks, original under tensor parallelism)"
        record["distributed"] = parallel.predicted_record(steps, bypass, [devices])
    return record
