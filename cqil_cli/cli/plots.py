"""PNG figures: the similarity heatmap of `cqil analyze`, the trade-off chart of `cqil bench`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..analyze.profile import AnalyzeReport
    from ..bench.report import BenchReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def similarity_heatmap(report: AnalyzeReport, path: Path) -> None:
    """Heatmap of the input cosine similarity between layers; blank outside the window."""
    import numpy as np

    plt = _pyplot()
    n = report.num_layers
    grid = np.array([[np.nan if v is None else v for v in row] for row in report.similarity])
    off_diagonal = grid[~np.eye(n, dtype=bool) & ~np.isnan(grid)]
    # The interesting contrast lies between ~0.8 and 1; a few early layers (layer 0's input is
    # the raw embedding) sit far lower and would flatten the scale, so they saturate instead.
    low = float(np.percentile(off_diagonal, 10)) if off_diagonal.size else 0.0
    low = min(max(low, 0.0), 0.95)
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=120)
    image = ax.imshow(grid, cmap="viridis", vmin=low, vmax=1.0,
                      origin="upper", interpolation="nearest")
    ax.set_xlabel("layer j (its input)")
    ax.set_ylabel("layer i (its input)")
    ax.set_title(f"{report.model_name}: cosine similarity of layer inputs\n"
                 f"window {report.window}, {report.tokens:,} calibration tokens")
    step = max(1, n // 15)
    ax.set_xticks(range(0, n, step))
    ax.set_yticks(range(0, n, step))
    fig.colorbar(image, ax=ax, extend="min",
                 label=f"mean cosine similarity (1 = identical inputs; below {low:.2f} saturates)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (x, y) no other point beats on both (lower x and lower y are better), by x:
    each is faster than every point below it and better than every point left of it."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def tradeoff_chart(report: BenchReport, path: Path) -> None:
    """`cqil bench --plot`: decode latency ratio to the baseline (x) against perplexity (y).

    One labelled point per model (the baseline at x = 1; its weights' format in the label when
    the run holds several), marker by engine, colour by the conversion strategy its manifest
    records; the points of one strategy are joined in order of
    latency (that strategy's trade-off), and a dashed grey step line traces the front of all of
    them. Dotted lines at the baseline's ratio and perplexity split the plane: lower left is
    faster and better.
    """
    from .tables import weights_format

    plt = _pyplot()
    base = report.baseline
    rows = [(base, base.get("label") or f"{base['model']} (baseline)")]
    if report.engine_baseline:
        eng = report.engine_baseline
        rows.append((eng, eng.get("label") or f"{eng['model']} (baseline, cqil engine)"))
    rows += [(r, r.get("label") or r["model"]) for r in report.results]
    # each point names its weights' format when the run compares several (fp32, bf16, int8...)
    formats = {weights_format(r) for r, _ in rows}
    if len(formats) > 1:
        rows = [(r, label if weights_format(r) in label else f"{label} · {weights_format(r)}")
                for r, label in rows]
    markers = {"transformers": "o", "cqil": "s"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    strategy_colors = {"cqil": colors[0], "skip": colors[1], "prune": colors[2]}
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=120)
    seen_engines = set()
    by_strategy: dict[str, list[tuple[float, float]]] = {}
    points = []
    for i, (row, label) in enumerate(rows):
        x = row["ratio_to_baseline"]["decode"]
        y = (row.get("quality") or {}).get("ppl")
        if x is None or y is None:
            continue
        engine, strategy = row["engine"], row.get("strategy")
        color = strategy_colors.get(strategy, "lightgrey" if i == 0 else colors[3 + i % 7])
        ax.scatter([x], [y], s=70, marker=markers.get(engine, "o"),
                   color=color, edgecolors="black", linewidths=0.6, zorder=3)
        seen_engines.add(engine)
        points.append((x, y))
        if strategy in strategy_colors:  # one line per strategy and format
            by_strategy.setdefault((strategy, weights_format(row)), []).append((x, y))
        short = label if len(label) <= 40 else "…" + label[-39:]
        ax.annotate(short, (x, y), textcoords="offset points", xytext=(6, 6 + 10 * (i % 2)),
                    fontsize=8)
    handles = []
    from matplotlib.lines import Line2D

    for (strategy, _fmt), pts in sorted(by_strategy.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=strategy_colors[strategy],
                linewidth=1.2, zorder=2)
    for strategy in sorted({s for s, _ in by_strategy}):
        handles.append(Line2D([], [], color=strategy_colors[strategy], marker="o",
                              markeredgecolor="black", label=strategy))
    front = pareto_front(points)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey",
                linestyle="--", linewidth=1, zorder=1)
        handles.append(Line2D([], [], color="grey", linestyle="--", label="front (no model "
                              "both faster and better)"))
    base_ppl = (base.get("quality") or {}).get("ppl")
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    if base_ppl is not None:
        ax.axhline(base_ppl, color="grey", linestyle=":", linewidth=1)
    ppls = [(r.get("quality") or {}).get("ppl") for r, _ in rows]
    ppls = [p for p in ppls if p is not None and p > 0]
    log_y = bool(ppls) and max(ppls) / min(ppls) > 3  # one bad model must not flatten the rest
    if log_y:
        ax.set_yscale("log")
    ax.margins(x=0.25, y=0.25)
    settings = report.settings
    ax.set_xlabel(f"decode latency per token, ratio to the baseline (p50, batch "
                  f"{settings['batches'][0]}; < 1 is faster)")
    ax.set_ylabel(f"perplexity on {settings['eval_spec']} (lower is better"
                  f"{'; log scale' if log_y else ''})")
    ax.set_title(f"Speed vs quality against {base['model']} on {report.device['name']}\n"
                 f"(lower left is better)")
    handles += [Line2D([], [], linestyle="", marker=markers.get(e, "o"), markersize=8,
                       markerfacecolor="white", markeredgecolor="black", label=f"{e} engine")
                for e in sorted(seen_engines)]
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
