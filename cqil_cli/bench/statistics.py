"""Summary statistics of timings, without numpy: percentile, summarize, ratio."""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    data = sorted(float(v) for v in values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(values: Iterable[float]) -> dict:
    """{p50, p90, mean, stdev (sample, n-1), min, max, n} of a list of numbers (STATS in
    docs/bench.md)."""
    data = [float(v) for v in values]
    n = len(data)
    if n == 0:
        nan = float("nan")
        return {"p50": nan, "p90": nan, "mean": nan, "stdev": nan, "min": nan, "max": nan, "n": 0}
    mean = sum(data) / n
    stdev = math.sqrt(sum((v - mean) ** 2 for v in data) / (n - 1)) if n > 1 else 0.0
    return {"p50": percentile(data, 50), "p90": percentile(data, 90), "mean": mean,
            "stdev": stdev, "min": min(data), "max": max(data), "n": n}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either side was not measured (None, NaN) or b is not positive."""
    if a is None or b is None or not (b > 0) or math.isnan(a) or math.isnan(b):
        return None
    return a / b
