"""Rich tables for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def analyze_tables(report: dict, console: Console, top: int = 15) -> None:
    n = report["num_layers"]
    sim = report["similarity"]
    layers = Table(title=f"{report['model_name']} — {n} layers, {report['tokens']:,} tokens of "
                   f"'{report['calibration']['spec']}' (ppl {report['ppl']:.2f})")
    layers.add_column("layer", justify="right")
    layers.add_column("cos(in ℓ, in ℓ+1)", justify="right")
    layers.add_column("block influence", justify="right")
    latency = report.get("latency_ms")
    if latency:
        layers.add_column("prefill ms", justify="right")
        layers.add_column("decode ms", justify="right")
    for i in range(n):
        row = [str(i), f"{sim[i][i + 1]:.4f}" if i + 1 < n else "—",
               f"{report['block_influence'][i]:.4f}"]
        if latency:
            row += [f"{latency['prefill'][i]:.2f}", f"{latency['decode'][i]:.3f}"]
        layers.add_row(*row)
    console.print(layers)
    if latency:
        console.print(
            f"prefill of {latency['prompt_tokens']} tokens: {latency['prefill_total']:.1f} ms "
            f"({latency['prefill_outside_layers']:.1f} outside the layers); one decode step: "
            f"{latency['decode_total']:.2f} ms ({latency['decode_outside_layers']:.2f} outside)")
    if report["groups"]:
        groups = Table(title=f"Most promising concurrent groups (of {len(report['groups'])}; "
                       "lowest KL per saved step first)")
        groups.add_column("layers")
        groups.add_column("size", justify="right")
        groups.add_column("KL(orig‖grouped)", justify="right")
        groups.add_column("KL / saved step", justify="right")
        groups.add_column("Δ loss", justify="right")
        groups.add_column("mean cos", justify="right")
        for row in report["groups"][:top]:
            groups.add_row(f"{row['layers'][0]}-{row['layers'][-1]}", str(row["size"]),
                           f"{row['kl']:.4f}", f"{row['kl_per_saved_step']:.4f}",
                           f"{row['delta_loss']:+.4f}", f"{row['mean_similarity']:.4f}")
        console.print(groups)
