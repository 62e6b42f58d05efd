"""What a bench run times: every model loaded once, one Entry per row of the report.

Entries that name the same spec share one loaded model but are timed separately (so
`MODEL --baseline MODEL` shows the noise floor); with --cqil-engine every plain model of a
family cqil's fast path runs (runtime/family_table_cqil.py), and the baseline, gets a twin
entry on cqil's engine. With several dtypes (`--dtype float32,bfloat16`) every MODEL is loaded
and timed in each (the baseline in the first), its label suffixed with the dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..inputs.models import require_engine
from .options import BenchOptions
from .runners import TransformersRunner, engine_of, make_runner
from .tokens import check_same_tokenizer

if TYPE_CHECKING:
    from ..inputs.models import LoadedModel


@dataclass
class Entry:
    """One timed and evaluated row: a loaded model on one engine."""

    key: str  # unique within the run
    spec: str  # as the user wrote it
    role: str  # "model", "baseline", "engine_baseline"
    engine: str
    loaded: LoadedModel
    runner: TransformersRunner  # or its subclass CqilRunner
    label: str  # short name for the table and the chart
    quality_key: tuple = ()  # entries with the same key share their quality numbers
    latency: list[dict] = field(default_factory=list)  # one dict per batch size
    quality: dict | None = None


@dataclass
class BenchPlan:
    """What will run: the entries, the baseline, and the engine baseline (or None)."""

    entries: list[Entry]
    baseline: Entry
    engine_baseline: Entry | None
    baseline_source: str  # "option", "manifest" or "config"

    @property
    def timed(self) -> list[Entry]:
        """Every entry in report order: the baseline, the engine baseline, the models."""
        extra = [self.engine_baseline] if self.engine_baseline is not None else []
        return [self.baseline, *extra, *self.entries]


DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def plan_entries(models: list[str], baseline_spec: str, baseline_source: str,
                 options: BenchOptions, load: Callable[[str, str | None], LoadedModel],
                 dtypes: tuple[str | None, ...] = (None,)) -> BenchPlan:
    """Load every distinct (spec, dtype) once (load(spec, dtype)) and build the timed entries:
    the baseline in dtypes[0], every MODEL in each dtype (None: load's default).

    Tokenizers are compared with the baseline's; a model that cannot run on cqil's engine
    with --cqil-engine is a CqilError.
    """
    cache: dict[tuple, LoadedModel] = {}

    def get(spec: str, dtype: str | None) -> LoadedModel:
        if (spec, dtype) not in cache:
            cache[spec, dtype] = load(spec, dtype)
        return cache[spec, dtype]

    runners: dict[tuple, TransformersRunner] = {}

    def entry(key: str, spec: str, role: str, engine: str, loaded: LoadedModel,
              label: str) -> Entry:
        shared = (id(loaded), engine)  # one runner, and one set of quality figures, per pair
        if shared not in runners:
            runners[shared] = make_runner(loaded, engine, options.compile)
        return Entry(key, spec, role, engine, loaded, runners[shared], label, shared)

    base_loaded = get(baseline_spec, dtypes[0])
    base_engine = engine_of(base_loaded)
    baseline = entry("baseline", baseline_spec, "baseline", base_engine, base_loaded,
                     f"{baseline_spec} (baseline)")
    engine_baseline = None
    if options.cqil_engine and base_engine != "cqil":
        require_engine(base_loaded, "fastgen", f"--cqil-engine: the baseline '{baseline_spec}'")
        engine_baseline = entry("baseline@cqil", baseline_spec, "engine_baseline", "cqil",
                                base_loaded, f"{baseline_spec} (baseline, cqil engine)")
    entries: list[Entry] = []
    for dtype in dtypes:
        suffix = f" [{DTYPE_SHORT.get(dtype, dtype)}]" if len(dtypes) > 1 else ""
        tag = f"@{dtype}" if len(dtypes) > 1 else ""
        for i, spec in enumerate(models):
            loaded = get(spec, dtype)
            check_same_tokenizer(base_loaded.tokenizer, loaded.tokenizer, baseline_spec, spec)
            engine = engine_of(loaded)
            label = (spec if models.count(spec) == 1 else f"{spec} #{i + 1}") + suffix
            entries.append(entry(f"model[{i}]{tag}", spec, "model", engine, loaded, label))
            if options.cqil_engine and engine != "cqil":
                require_engine(loaded, "fastgen", f"--cqil-engine: '{spec}'")
                entries.append(entry(f"model[{i}]{tag}@cqil", spec, "model", "cqil", loaded,
                                     f"{label} (cqil engine)"))
    return BenchPlan(entries, baseline, engine_baseline, baseline_source)
