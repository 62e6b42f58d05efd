"""The README's results table (cqil_cli/benchmarks/readme_table.py): rendered right from bench
reports, and the README holds exactly what the script renders from the committed reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cqil_cli.benchmarks.readme_table import BEGIN, END, main, render, replace_block
from cqil_cli.core.errors import CqilError

ROOT = Path(__file__).resolve().parents[1]


def entry(strategy, steps, engine, decode_ms=None, same=None, generate=None, ppl=None):
    """A bench ENTRY with only what the table reads (latency None when decode_ms is None)."""
    latency = None if decode_ms is None else {
        "decode_ms_per_token": {"p50": decode_ms}, "prefill_ms": {"p50": 1.0}}
    return {
        "model": f"{strategy}{steps}", "name": "m", "engine": engine, "strategy": strategy,
        "num_layers": 30, "num_steps": steps, "latency": latency,
        "quality": None if ppl is None else {"ppl": ppl},
        "ratio_to_baseline": {"decode": generate},
        "ratio_to_baseline_same_engine": None if same is None else {"decode": same},
    }


def document(spec, latency, rows, base_ppl, device=None):
    """A cqil.bench/1 document: the baseline on transformers and on cqil's engine, then rows."""
    device = device or {"name": "cpu", "type": "cpu", "description": "x86_64, 2 CPU cores",
                        "dtype": "float32", "torch": "2.13.0", "threads": 2,
                        "cpu_model": "AMD EPYC"}
    t = 80.0 if latency else None
    return {
        "schema": "cqil.bench/1", "cqil_version": "0.1.0", "created": "2026-12-04T18:00:00+0000",
        "device": device,
        "settings": {"eval_spec": spec, "latency": latency, "quality": True, "batches": [1],
                     "prompt_len": 128, "new_tokens": 32, "repeats": 5, "eval_windows": 32,
                     "eval_window": 256, "eval_prompt": 128},
        "baseline": entry(None, 30, "transformers", t, 1.0 if t else None,
                          1.0 if t else None, base_ppl),
        "engine_baseline": entry(None, 30, "cqil", 50.0 if t else None, 1.0 if t else None,
                                 0.625 if t else None, base_ppl),
        "results": rows,
    }


@pytest.fixture
def reports(tmp_path):
    main_doc = document("default:heldout", True, [
        entry("cqil", 24, "cqil", 44.0, 0.88, 0.55, 40.0),
        entry("prune", 24, "transformers", 70.0, 0.875, 0.875, 45.0),
        entry("prune", 24, "cqil", 42.0, 0.84, 0.525, 45.0),
        entry("skip", 16, "cqil", 30.0, 0.6, 0.375, 80.0),
    ], base_ppl=36.0)
    ood_doc = document("default:ood", False, [
        entry("cqil", 24, "cqil", ppl=39.0),
        entry("prune", 24, "transformers", ppl=60.0),
        entry("prune", 24, "cqil", ppl=60.0),
        entry("skip", 16, "cqil", ppl=300.0),
    ], base_ppl=30.0)
    paths = [tmp_path / "bench.json", tmp_path / "bench-ood.json"]
    for path, doc in zip(paths, (main_doc, ood_doc), strict=True):
        path.write_text(json.dumps(doc))
    return paths


def table_rows(block: str) -> list[list[str]]:
    """The table's header and rows as cells (without the alignment row)."""
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in block.splitlines() if line.startswith("| ") and "---" not in line]


def test_table_from_a_synthetic_report(reports):
    block = render(reports, ["a.json", "b.json"])
    rows = table_rows(block)
    assert rows[0] == ["device", "steps", "model", "engine", "decode ms/token",
                       "decode × original, same engine", "decode × original on `generate()`",
                       "held-out perplexity", "out-of-domain perplexity"]
    assert rows[1:] == [
        ["AMD EPYC, 2 CPU cores (cpu, float32)", "30", "original", "transformers", "80.00",
         "1.000 ×", "1.000 ×", "36.00", "30.00"],
        ["", "30", "original", "cqil", "50.00", "1.000 ×", "0.625 ×", "36.00", "30.00"],
        # one row per strategy and depth, on cqil's engine where it ran there
        ["", "24", "**cqil**", "cqil", "44.00", "0.880 ×", "0.550 ×", "40.00 (+11.1 %)",
         "39.00 (+30.0 %)"],
        ["", "24", "prune", "cqil", "42.00", "0.840 ×", "0.525 ×", "45.00 (+25.0 %)",
         "60.00 (+100.0 %)"],
        ["", "16", "skip", "cqil", "30.00", "0.600 ×", "0.375 ×", "80.00 (+122.2 %)",
         "300.00 (+900.0 %)"],
    ]
    assert "- `a.json`: AMD EPYC, 2 CPU cores (cpu, float32), 2026-12-04, torch 2.13.0, 2 " \
           "threads; latency: batch 1, 128-token prompt, 32 new tokens, 5 rounds; perplexity " \
           "on `default:heldout` (4096 scored tokens)\n" in block
    assert "- `b.json`: AMD EPYC, 2 CPU cores (cpu, float32), 2026-12-04, torch 2.13.0, 2 " \
           "threads; perplexity on `default:ood` (4096 scored tokens)\n" in block
    assert "python -m cqil_cli.benchmarks.readme_table a.json b.json --write README.md" in block


def test_a_gpu_report_is_its_own_device(reports, tmp_path):
    gpu = document("default:heldout", True, [entry("cqil", 24, "cqil", 1.8, 0.85, 0.05, 38.0)],
                   base_ppl=36.0, device={"name": "cuda", "type": "cuda", "dtype": "float32",
                                          "description": "NVIDIA H200", "cpu_model": "Xeon"})
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(gpu))
    rows = table_rows(render([*reports, path]))
    gpu_rows = rows[rows.index(next(r for r in rows if r[0].startswith("NVIDIA H200"))):]
    assert [r[1:3] for r in gpu_rows] == [["30", "original"], ["30", "original"],
                                          ["24", "**cqil**"]]
    assert gpu_rows[-1][-1] == "—"  # no out-of-domain report for that device


def test_foreign_documents_and_missing_markers_are_one_line_errors(tmp_path, reports):
    bad = tmp_path / "analyze.json"
    bad.write_text(json.dumps({"schema": "cqil.analyze/2"}))
    with pytest.raises(CqilError, match="not a `cqil bench --json` report"):
        render([bad])
    with pytest.raises(CqilError, match="results:begin"):
        replace_block("# no markers\n", "x", "README.md")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold\n{END}\nafter\n")
    other = tmp_path / "other.md"
    other.write_text("no markers\n")
    assert main([*map(str, reports), "--write", str(readme), "--write", str(other)]) == 2
    assert "old" in readme.read_text()  # nothing written when one file has no markers
    assert main([*map(str, reports), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"intro\n{BEGIN}\n<!-- generated") and text.endswith(f"{END}\nafter\n")
    assert "old" not in text


def test_readme_and_docs_hold_the_table_of_the_committed_reports():
    """README.md, docs/performance.md and docs/quality.md hold the block the script renders from
    the reports its own command names, and that command names every report committed in
    docs/results/ and writes every file that has the markers."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(BEGIN) + len(BEGIN): readme.index(END)].strip("\n")
    command = re.search(r"readme_table ((?:\S+\.json )+)((?:--write \S+ ?)+)`", block)
    assert command, "the README's results block names no reports"
    sources, targets = command[1].split(), command[2].split()[1::2]
    assert sorted(sources) == sorted(str(p.relative_to(ROOT))
                                     for p in (ROOT / "docs" / "results").glob("*.json"))
    marked = [str(p.relative_to(ROOT)) for p in [ROOT / "README.md",
                                                  *sorted((ROOT / "docs").glob("*.md"))]
              if BEGIN in p.read_text()]
    assert targets == marked
    expected = render([ROOT / s for s in sources], sources, tuple(targets))
    for target in targets:
        text = (ROOT / target).read_text()
        assert text[text.index(BEGIN) + len(BEGIN): text.index(END)].strip("\n") == expected, \
            f"{target}: the results table is stale: run the command in its results block"


def test_docs_speak_of_the_product_not_of_issue_numbers():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = [f"{p.relative_to(ROOT)}: {m[0]!r}" for p in files
             for m in re.finditer(r"issue\s*#?\d+", p.read_text(), re.IGNORECASE)]
    assert not found, found
