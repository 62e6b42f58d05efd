"""The latency measurement of `cqil bench` (docs/bench.md, "Latency").

For each batch size B: the B prompts of BenchTokens. Every entry first runs --warmup times
(reported apart as warmup_ms), then --repeats rounds in which every entry runs once,
round-robin (the starting entry rotates each round), so slow drift (thermals, other processes)
hits all entries alike. The runners read a clock after every generated token: the first
interval is the prefill (prompt forward + first token), every later one a decode step.
"""

from __future__ import annotations

from collections.abc import Callable

from .memory import PeakMemory
from .options import BenchOptions
from .plan import Entry
from .statistics import percentile, summarize
from .tokens import BenchTokens


def run_latency(entries: list[Entry], tokens: BenchTokens, options: BenchOptions,
                advance: Callable[[str], None]) -> None:
    """Fill entry.latency (one LATENCY dict per batch size): warm-up apart, then round-robin
    repeats; the first timed run of each entry also measures its peak memory."""
    for batch in options.batches:
        prompt = tokens.prompts[batch]
        prefill_ms: dict[str, list[float]] = {e.key: [] for e in entries}
        decode_ms: dict[str, list[float]] = {e.key: [] for e in entries}
        total_s: dict[str, list[float]] = {e.key: [] for e in entries}
        warmup_ms: dict[str, list[float]] = {e.key: [] for e in entries}
        memory: dict[str, PeakMemory] = {}
        for entry in entries:
            for _ in range(options.warmup):
                timing = entry.runner.generate(prompt, options.new_tokens)
                warmup_ms[entry.key].append(timing.total_s * 1000)
                advance(f"warm-up {entry.label} (batch {batch})")
        n = len(entries)
        for r in range(options.repeats):
            for entry in entries[r % n:] + entries[:r % n]:
                if entry.key not in memory:  # the first timed run also measures memory
                    memory[entry.key] = PeakMemory(entry.runner.device)
                    with memory[entry.key]:
                        timing = entry.runner.generate(prompt, options.new_tokens)
                else:
                    timing = entry.runner.generate(prompt, options.new_tokens)
                prefill_ms[entry.key].append(timing.prefill_s * 1000)
                decode_ms[entry.key].extend(d * 1000 for d in timing.decode_s)
                total_s[entry.key].append(timing.total_s)
                advance(f"timing {entry.label} (batch {batch}, round {r + 1})")
        for entry in entries:
            total_p50 = percentile(total_s[entry.key], 50)
            decode = summarize(decode_ms[entry.key])
            decode_p50 = decode["p50"]
            entry.latency.append({
                "batch": batch,
                "prompt_len": options.prompt_len,
                "new_tokens": options.new_tokens,
                "prefill_ms": summarize(prefill_ms[entry.key]),
                "decode_ms_per_token": decode,
                "total_ms": summarize([s * 1000 for s in total_s[entry.key]]),
                "tokens_per_s": batch * options.new_tokens / total_p50 if total_p50 > 0 else None,
                "decode_tokens_per_s": batch * 1000.0 / decode_p50 if decode_p50 > 0 else None,
                "warmup_ms": warmup_ms[entry.key],
                "peak_memory": memory[entry.key].to_json(),
            })
