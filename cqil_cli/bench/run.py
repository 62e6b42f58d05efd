"""A whole `cqil bench` run over a plan: latency, then quality, then the report."""

from __future__ import annotations

from collections.abc import Callable

from .latency import run_latency
from .options import BenchOptions
from .plan import BenchPlan
from .quality import run_quality
from .report import BenchReport, assemble_report
from .tokens import bench_tokens


def run_bench(plan: BenchPlan, options: BenchOptions, device: str, dtype: str,
              advance: Callable[[str], None] | None = None, rank_device: str = "cpu",
              load_kwargs: dict | None = None) -> BenchReport:
    """Measure every entry of the plan (advance(label) after each step, progress_steps in all);
    returns the report. With options.devices W > 1, the baseline and every MODEL are also
    timed on W ranks of the distributed engine (bench/distributed.py) on `rank_device`."""
    options.check()
    advance = advance or (lambda _label: None)
    tokens = bench_tokens(plan.baseline.loaded.tokenizer, options)
    if options.latency:
        run_latency(plan.timed, tokens, options, advance)
    if options.quality:
        run_quality(plan.timed[1:], plan.baseline, tokens, options, advance)
    report = assemble_report(plan, options, device, dtype, tokens)
    if options.devices > 1:
        from .distributed import bench_on_ranks

        specs = [plan.baseline.spec] + [e.spec for e in plan.entries]
        report.distributed = bench_on_ranks(
            specs, options.devices, tokens.prompts[options.batches[0]], options.new_tokens,
            options.warmup, options.repeats, rank_device, dtype, **(load_kwargs or {}),
            on_model=lambda spec: advance(f"{spec} on {options.devices} ranks"))
    return report


def progress_steps(plan: BenchPlan, options: BenchOptions) -> int:
    """How many times run_bench calls `advance` (for a progress bar)."""
    steps = len(plan.entries) + 1 if options.devices > 1 else 0
    if options.latency:
        steps += len(options.batches) * len(plan.timed) * (options.warmup + options.repeats)
    if options.quality:
        teacher_forced = -(-options.eval_windows // options.eval_batch)  # ceil
        greedy = len({e.quality_key for e in plan.timed})  # one per distinct model and engine
        steps += teacher_forced + greedy
    return steps
