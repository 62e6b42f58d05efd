"""The README's results table, generated from `cqil bench --json` reports so that it cannot drift.

One markdown table: for every device measured, the original model and each converted model
(strategy cqil, skip, prune; 24 and 16 sequential steps, or whatever depths the reports hold):
its decode time per token, the ratio to the original on the same engine in the same run, the
ratio to the original on transformers' `generate()`, and its perplexity (with the change from
the original's) on every evaluation text the reports were measured on. Reports of the same
device and dtype are merged: typically one with latency and held-out perplexity, and one run
with `--no-latency --eval default:ood` for the out-of-domain column.

    python -m cqil_cli.benchmarks.readme_table BENCH.json [BENCH.json ...] [--write FILE ...]

Without --write the block is printed; with it, the text between the two marker lines
(`<!-- results:begin -->`, `<!-- results:end -->`) of each FILE is replaced by it: README.md,
docs/performance.md and docs/quality.md hold the same block. tests/test_readme_table.py checks
that every file with the markers holds exactly what this renders from the committed reports in
docs/results/.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..bench.report import BenchReport
from ..core.documents import read_json
from ..core.errors import CqilError
from ..core.files import write_file_atomic

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
STRATEGIES = ("cqil", "skip", "prune")  # the table's order within one depth
EVAL_NAMES = {"default:heldout": "held-out", "default:ood": "out-of-domain"}


@dataclass
class Device:
    """One device's rows, merged from every report measured on it."""

    label: str
    notes: list[str] = field(default_factory=list)
    rows: dict[tuple, dict] = field(default_factory=dict)  # row key -> ENTRY, latency source
    quality: dict[tuple, dict[str, dict]] = field(default_factory=dict)  # key -> eval -> quality
    ppl_base: dict[str, float] = field(default_factory=dict)  # eval spec -> original's ppl


def load(path: Path) -> BenchReport:
    """A cqil.bench/1 report (its schema tag and keys checked), or a one-line CqilError."""
    return BenchReport.from_json(read_json(path, "a `cqil bench --json` report"), str(path))


def device_label(device: dict) -> str:
    """'AMD EPYC, 2 CPU cores (cpu, float32)': the CPU's or GPU's name, then type and dtype."""
    if device.get("type") == "cpu":
        cores = device.get("description", "").rpartition(", ")[2]
        name = ", ".join(x for x in (device.get("cpu_model"), cores) if x) or "CPU"
    else:
        name = device.get("description") or device.get("name", "?")
    return f"{name} ({device.get('type', '?')}, {device.get('dtype', '?')})"


def row_key(entry: dict) -> tuple:
    """(steps, strategy, engine) of an entry; the original is strategy 'original'."""
    return entry["num_steps"], entry.get("strategy") or "original", entry["engine"]


def merge(devices: dict[str, Device], report: BenchReport, source: str) -> None:
    """Add one report's entries to its device: latency from the first report that timed the
    entry, perplexity per evaluation text from the first report that scored it."""
    label = device_label(report.device)
    dev = devices.setdefault(label, Device(label))
    settings, spec = report.settings, report.settings.get("eval_spec", "?")
    when = report.created[:10]
    what = []
    if settings.get("latency"):
        what.append(f"latency: batch {settings['batches'][0]}, {settings['prompt_len']}-token "
                    f"prompt, {settings['new_tokens']} new tokens, {settings['repeats']} rounds")
    if settings.get("quality"):
        scored = settings["eval_windows"] * (settings["eval_window"] - settings["eval_prompt"])
        what.append(f"perplexity on `{spec}` ({scored} scored tokens)")
    dev.notes.append(f"`{source}`: {label}, {when}, torch {report.device.get('torch', '?')}, "
                     f"{report.device.get('threads', '?')} threads; {'; '.join(what)}")
    base_quality = report.baseline.get("quality")
    if base_quality and spec not in dev.ppl_base:
        dev.ppl_base[spec] = base_quality["ppl"]
    for entry in report.rows:
        key = row_key(entry)
        if entry.get("latency") and key not in dev.rows:
            same = entry.get("ratio_to_baseline_same_engine") or {}
            dev.rows[key] = {"decode_ms": entry["latency"]["decode_ms_per_token"]["p50"],
                             "same_engine": same.get("decode"),
                             "generate": (entry.get("ratio_to_baseline") or {}).get("decode")}
        if entry.get("quality"):
            dev.quality.setdefault(key, {}).setdefault(spec, entry["quality"])
        dev.rows.setdefault(key, {"decode_ms": None, "same_engine": None, "generate": None})


def chosen_rows(dev: Device) -> list[tuple]:
    """The original on each engine, then per depth (deepest first) each strategy once: on
    cqil's engine when it ran there, else on the engine it ran on."""
    keys = sorted(dev.rows, key=lambda k: (-k[0], k[2] != "transformers"))
    originals = [k for k in keys if k[1] == "original"]
    out = originals[:]
    depths = sorted({k[0] for k in keys if k[1] != "original"}, reverse=True)
    for steps in depths:
        names = sorted({k[1] for k in keys if k[0] == steps and k[1] != "original"},
                       key=lambda s: (STRATEGIES.index(s) if s in STRATEGIES else 99, s))
        for name in names:
            options = [k for k in keys if k[0] == steps and k[1] == name]
            out.append(next((k for k in options if k[2] == "cqil"), options[0]))
    return out


def fmt_ratio(value: float | None) -> str:
    return f"{value:.3f} ×" if value is not None else "—"


def fmt_ppl(quality: dict | None, base: float | None, original: bool) -> str:
    if quality is None:
        return "—"
    if original or base is None:
        return f"{quality['ppl']:.2f}"
    return f"{quality['ppl']:.2f} ({100 * (quality['ppl'] / base - 1):+.1f} %)"


def render(paths: list[Path], sources: list[str] | None = None,
           targets: tuple[str, ...] = ("README.md",)) -> str:
    """The markdown block (without the markers) for these reports; sources: how each path is
    written in the block (default: as given); targets: the files its command writes."""
    sources = sources or [str(p) for p in paths]
    devices: dict[str, Device] = {}
    for path, source in zip(paths, sources, strict=True):
        merge(devices, load(path), source)
    specs = list(dict.fromkeys(s for d in devices.values() for s in d.ppl_base))
    header = ["device", "steps", "model", "engine", "decode ms/token",
              "decode × original, same engine", "decode × original on `generate()`"]
    header += [f"{EVAL_NAMES.get(s, f'`{s}`')} perplexity" for s in specs]
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + " |"]
    for dev in devices.values():
        for i, key in enumerate(chosen_rows(dev)):
            steps, name, engine = key
            row, quality = dev.rows[key], dev.quality.get(key, {})
            original = name == "original"
            model = "original" if original else f"**{name}**" if name == "cqil" else name
            decode = f"{row['decode_ms']:.2f}" if row["decode_ms"] is not None else "—"
            cells = [dev.label if i == 0 else "", str(steps), model,
                     "cqil" if engine == "cqil" else "transformers", decode,
                     fmt_ratio(row["same_engine"]), fmt_ratio(row["generate"])]
            cells += [fmt_ppl(quality.get(s), dev.ppl_base.get(s), original) for s in specs]
            lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {note}" for d in devices.values() for note in d.notes]
    command = "python -m cqil_cli.benchmarks.readme_table " + " ".join(sources) + \
        "".join(f" --write {t}" for t in targets)
    return "\n".join([
        "<!-- generated by cqil_cli/benchmarks/readme_table.py; do not edit by hand -->",
        *lines, "", "Measured by `cqil bench` (docs/bench.md):", *notes, "",
        f"Regenerate with `{command}`.",
    ])


def replace_block(text: str, block: str, where: str) -> str:
    """text with what lies between the two marker lines replaced by block."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise CqilError(f"{where}: no '{BEGIN}' line followed by an '{END}' line")
    return text[: start + len(BEGIN)] + "\n" + block + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="`cqil bench --json` reports")
    parser.add_argument("--write", type=Path, action="append", default=[], metavar="FILE",
                        help="replace the block between the markers of FILE (repeatable)")
    args = parser.parse_args(argv)
    try:
        block = render(args.reports, targets=tuple(map(str, args.write)) or ("README.md",))
        if not args.write:
            print(block)
            return 0
        texts = {path: replace_block(path.read_text(), block, str(path)) for path in args.write}
        for path, text in texts.items():  # every file checked before any is written
            write_file_atomic(path, lambda tmp, text=text: tmp.write_text(text))
    except (CqilError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the results table into {', '.join(map(str, args.write))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
