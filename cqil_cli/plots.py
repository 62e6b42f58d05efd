"""PNG figures: the similarity heatmap of `cqil analyze`."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def similarity_heatmap(report: dict, path: Path) -> None:
    """Heatmap of the input cosine similarity between layers; blank outside the window."""
    import numpy as np

    plt = _pyplot()
    n = report["num_layers"]
    grid = np.array([[np.nan if v is None else v for v in row] for row in report["similarity"]])
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
    ax.set_title(f"{report['model_name']}: cosine similarity of layer inputs\n"
                 f"window {report['window']}, {report['tokens']:,} calibration tokens")
    step = max(1, n // 15)
    ax.set_xticks(range(0, n, step))
    ax.set_yticks(range(0, n, step))
    fig.colorbar(image, ax=ax, extend="min",
                 label=f"mean cosine similarity (1 = identical inputs; below {low:.2f} saturates)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
