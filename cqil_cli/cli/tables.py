"""Rich tables for the terminal: `cqil analyze` (analyze_tables) and `cqil bench`
(bench_tables)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from ..analyze.profile import AnalyzeReport
    from ..bench.report import BenchReport


def analyze_tables(report: AnalyzeReport, console: Console, top: int = 15) -> None:
    """One row per layer (similarity to the next, block influence, latency), then the most
    promising groups (docs/analyze.md)."""
    n = report.num_layers
    sim = report.similarity
    layers = Table(title=f"{report.model_name} — {n} layers, {report.tokens:,} tokens of "
                   f"'{report.calibration['spec']}' (ppl {report.ppl:.2f})")
    layers.add_column("layer", justify="right")
    layers.add_column("cos(in ℓ, in ℓ+1)", justify="right")
    layers.add_column("block influence", justify="right")
    latency = report.latency_ms
    if latency:
        layers.add_column("prefill ms", justify="right")
        layers.add_column("decode ms", justify="right")
    for i in range(n):
        row = [str(i), f"{sim[i][i + 1]:.4f}" if i + 1 < n else "—",
               f"{report.block_influence[i]:.4f}"]
        if latency:
            row += [f"{latency['prefill'][i]:.2f}", f"{latency['decode'][i]:.3f}"]
        layers.add_row(*row)
    console.print(layers)
    if latency:
        console.print(
            f"prefill of {latency['prompt_tokens']} tokens: {latency['prefill_total']:.1f} ms "
            f"({latency['prefill_outside_layers']:.1f} outside the layers); one decode step: "
            f"{latency['decode_total']:.2f} ms ({latency['decode_outside_layers']:.2f} outside)")
    if report.groups:
        from ..analyze.profile import group_cost

        exact = report.sensitivity_measure == "output_kl"
        what = "KL(orig‖grouped)" if exact else "local error"
        groups = Table(title=f"Most promising concurrent groups (of {len(report.groups)}; "
                       f"lowest {'KL' if exact else 'local error'} per saved step first)")
        groups.add_column("layers")
        groups.add_column("size", justify="right")
        groups.add_column(what, justify="right")
        groups.add_column("per saved step", justify="right")
        if exact:
            groups.add_column("Δ loss", justify="right")
        groups.add_column("mean cos", justify="right")
        for row in report.groups[:top]:
            cost = group_cost(row)
            cells = [f"{row['layers'][0]}-{row['layers'][-1]}", str(row["size"]), f"{cost:.4f}",
                     f"{cost / (row['size'] - 1):.4f}"]
            if exact:
                cells.append(f"{row['delta_loss']:+.4f}")
            groups.add_row(*cells, f"{row['mean_similarity']:.4f}")
        console.print(groups)


def _num(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, fmt)


def _times(value) -> str:
    return "—" if value is None else f"×{value:.3f}"


def weights_format(row: dict) -> str:
    """A bench row's weights: int8 / int4 (convert --weights) or the dtype they are in."""
    from ..bench.plan import DTYPE_SHORT

    dtype = row.get("dtype")
    return row.get("weights") or DTYPE_SHORT.get(dtype, dtype or "")


def bench_tables(report: BenchReport, console: Console) -> None:
    """One row per entry (baseline first), latency at the first batch size, ratios to it
    (docs/bench.md, "The table").

    Latency and quality share one table on a wide terminal and get one table each otherwise.
    """
    settings = report.settings
    rows = report.rows
    first_batch = settings["batches"][0]
    title = f"cqil bench on {report.device['name']} ({report.device['dtype']})"
    latency_note = (f"batch {first_batch}, prompt {settings['prompt_len']}, "
                    f"{settings['new_tokens']} new tokens, p50 of {settings['repeats']} rounds; "
                    "× = ratio to the baseline")
    latency_cols = ["prefill ms", "decode ms/tok", "tok/s", "peak MB"]
    quality_cols = ["ppl", "KL", "top-1", "greedy"]

    def label(i: int, row: dict) -> str:
        if row.get("label"):  # reports before 0.x had none
            return row["label"]
        if i == 0 or row is report.engine_baseline:
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
        for name in ["model", "engine", "weights", "steps"] + columns:
            t.add_column(name, justify="left" if name in ("model", "engine") else "right")
        for i, row in enumerate(rows):
            t.add_row(label(i, row), row["engine"], weights_format(row),
                      f"{row['num_steps']}/{row['num_layers']}", *cells(row))
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
    if report.distributed:
        console.print(distributed_table(report.distributed))
    if settings["quality"]:
        console.print(f"quality: {settings['eval_windows']} windows of {settings['eval_window']}"
                      f" tokens of '{settings['eval_spec']}', scored after a "
                      f"{settings['eval_prompt']}-token prompt; greedy: "
                      f"{settings['greedy_prompts']} prompts, {settings['greedy_tokens']} tokens "
                      "each", style="dim")


def distributed_table(section: dict) -> Table:
    """`bench --ranks W`: decode and prefill on W ranks, each rank's share of the weights and
    its peak resident memory."""
    t = Table(title=f"on {section['world_size']} ranks ({section['device']}, {section['dtype']}):"
                    f" batch {section['batch']}, prompt {section['prompt_tokens']}, "
                    f"{section['new_tokens']} new tokens, p50 of {section['repeats']} runs")
    for name in ("model", "steps", "prefill ms", "decode ms/tok", "weights per rank",
                 "peak MB per rank"):
        t.add_column(name, justify="left" if name == "model" else "right")
    for i, row in enumerate(section["rows"]):
        ranks = row["ranks"]
        t.add_row(f"{row['model']}{' (baseline)' if i == 0 else ''}",
                  f"{row['num_steps']}/{row['num_layers']}",
                  _num(row["prefill_ms"]["p50"], ".1f"),
                  f"{_num(row['decode_ms_per_token']['p50'], '.2f')} "
                  f"{_times(row['decode_ratio_to_baseline'])}",
                  " / ".join(f"{r['weight_fraction']:.3f}" for r in ranks),
                  " / ".join(f"{r['peak_rss_mb']:.0f}" for r in ranks))
    return t
