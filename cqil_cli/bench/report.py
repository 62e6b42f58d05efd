"""The `cqil bench` report: BenchReport, the one definition of the cqil.bench/1 document
(every key in docs/bench.md, "The JSON report"), and how it is assembled from measured entries.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch

from .. import __version__
from ..core.documents import Schema
from .baseline import base_weights_match
from .memory import MB
from .options import BenchOptions
from .plan import BenchPlan, Entry
from .runners import is_converted
from .statistics import ratio
from .tokens import BenchTokens

SCHEMA = Schema("cqil.bench", 1, "a `cqil bench --json` report", "run `cqil bench` again")


@dataclass
class BenchReport:
    """A `cqil bench` report (schema cqil.bench/1).

    device: where it ran (name, type, description, dtype, versions, threads); settings: the
    BenchOptions plus eval_windows, eval_prompt and eval_text_tokens. baseline, engine_baseline
    (the baseline on cqil's engine with --cqil-engine, else None) and each of results (one per
    MODEL, in the order given) are ENTRY objects of docs/bench.md, kept as plain JSON objects.
    """

    schema: ClassVar[str] = SCHEMA.tag
    cqil_version: str
    created: str  # local time, e.g. 2025-01-01T12:00:00+0000
    device: dict
    settings: dict
    baseline: dict
    engine_baseline: dict | None
    results: list[dict]
    distributed: dict | None = None  # --ranks W > 1: bench/distributed.py's object

    @property
    def rows(self) -> list[dict]:
        """Every entry in table order: the baseline, the engine baseline, the results."""
        extra = [self.engine_baseline] if self.engine_baseline else []
        return [self.baseline, *extra, *self.results]

    def to_json(self) -> dict:
        return {"schema": SCHEMA.tag, **asdict(self)}

    @classmethod
    def from_json(cls, data: object, source: str) -> BenchReport:
        """The report of a parsed document; a foreign, older or newer schema, or a missing key,
        is a one-line CqilError naming source."""
        data = SCHEMA.check(data, source)
        required = tuple(f.name for f in fields(cls) if f.default is MISSING)
        SCHEMA.require(data, required, source)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def assemble_report(plan: BenchPlan, options: BenchOptions, device: str, dtype: str,
                    tokens: BenchTokens) -> BenchReport:
    """The report of a measured plan (entry.latency and entry.quality filled in)."""
    baseline, engine_baseline = plan.baseline, plan.engine_baseline
    base = entry_json(baseline)
    base["source"] = plan.baseline_source
    eng = entry_json(engine_baseline) if engine_baseline is not None else None
    for row in [base] + ([eng] if eng else []):
        row["ratio_to_baseline"] = ratios(row, base)
    if eng:
        eng["ratio_to_baseline_same_engine"] = ratios(eng, eng)
    base["ratio_to_baseline_same_engine"] = ratios(base, base)
    results = []
    digests: dict[str, dict] = {}
    for entry in plan.entries:
        row = entry_json(entry)
        if is_converted(entry.loaded):
            row["base_weights_match"] = base_weights_match(entry.loaded, baseline.loaded, digests)
        row["ratio_to_baseline"] = ratios(row, base)
        same = eng if (eng is not None and entry.engine == engine_baseline.engine) else (
            base if entry.engine == baseline.engine else None)
        row["ratio_to_baseline_same_engine"] = ratios(row, same) if same else None
        results.append(row)
    settings = asdict(options)
    settings["batches"] = list(options.batches)
    settings["eval_windows"] = options.eval_windows if options.quality else 0
    settings["eval_prompt"] = options.eval_prompt_tokens
    settings["eval_text_tokens"] = tokens.stream_tokens
    return BenchReport(cqil_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       device=device_info(device, dtype), settings=settings, baseline=base,
                       engine_baseline=eng, results=results)


def device_info(device: str, dtype: str) -> dict:
    """The report's `device`: name, type, dtype, versions, threads and a description."""
    dev = torch.device(device)
    info = {"name": str(dev), "type": dev.type, "dtype": dtype, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_model": cpu_model()}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        info["description"] = torch.cuda.get_device_name(index)
    else:
        info["description"] = f"{platform.processor() or platform.machine()}, " \
                              f"{os.cpu_count()} CPU cores"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def cpu_model() -> str | None:
    """The host CPU's model name (`lscpu`'s, from /proc/cpuinfo), else platform.processor();
    None when neither says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def entry_json(entry: Entry) -> dict:
    """An ENTRY of the report without its ratios (and without the baseline's source)."""
    loaded = entry.loaded
    config = loaded.model.config
    converted = is_converted(loaded)
    groups = getattr(config, "groups", None) if converted else None
    skipped = list(getattr(config, "skip_layers", None) or []) if converted else []
    model = entry.runner.model
    from ..runtime.quant_cqil import quantized_linears

    # the weights a quantized linear stands for are buffers (its codes): counted as parameters
    params = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in quantized_linears(model))
    # parameters and buffers (a quantized folder's codes and scales are buffers), each once
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    weights = getattr(config, "weights", None) if converted else None
    return {
        "model": entry.spec,
        "label": entry.label,
        "name": loaded.name,
        "engine": entry.engine,
        "model_type": loaded.model_type,
        "strategy": strategy_of(loaded),
        "path": str(loaded.path) if loaded.path else None,
        "num_layers": int(config.num_hidden_layers),
        # sequential steps of a generated token: a layer-skipping model's prompt runs deeper
        "num_steps": (len(groups) if groups else int(config.num_hidden_layers)) - len(skipped),
        "groups": [g for g in groups if len(g) > 1] if groups else [],
        "skip_layers": skipped,
        "params": params,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        # int8 | int4: the linears' stored format (convert --weights), None: they are in dtype
        "weights": weights["format"] if weights else None,
        "weights_mb": weight_bytes / MB,
        "latency": entry.latency[0] if entry.latency else None,
        "latency_by_batch": entry.latency,
        "quality": entry.quality,
    }


def strategy_of(loaded) -> str | None:
    """The conversion strategy a cqil-written folder's manifest records (cqil, skip, prune);
    None for a model cqil did not write."""
    from ..runtime.manifest import read_manifest

    if loaded.path is None or not Path(loaded.path).is_dir():
        return None
    manifest = read_manifest(Path(loaded.path))
    return manifest.strategy if manifest is not None else None


def ratios(row: dict, base: dict) -> dict:
    """An ENTRY's ratio_to_baseline against another ENTRY: decode, prefill and tokens_per_s at
    the first batch size, ppl, and the latency ratios of every batch size (None: unmeasured)."""
    by_batch = []
    for mine, theirs in zip(row["latency_by_batch"], base["latency_by_batch"], strict=True):
        by_batch.append({
            "batch": mine["batch"],
            "decode": ratio(mine["decode_ms_per_token"]["p50"],
                            theirs["decode_ms_per_token"]["p50"]),
            "prefill": ratio(mine["prefill_ms"]["p50"], theirs["prefill_ms"]["p50"]),
            "tokens_per_s": ratio(mine["tokens_per_s"], theirs["tokens_per_s"]),
        })
    first = by_batch[0] if by_batch else {"decode": None, "prefill": None, "tokens_per_s": None}
    quality, base_quality = row.get("quality"), base.get("quality")
    return {
        "decode": first["decode"],
        "prefill": first["prefill"],
        "tokens_per_s": first["tokens_per_s"],
        "ppl": ratio(quality["ppl"], base_quality["ppl"]) if quality and base_quality else None,
        "by_batch": by_batch,
    }
