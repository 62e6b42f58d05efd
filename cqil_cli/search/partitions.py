"""Choosing the grouping: an exact dynamic program under a latency budget (docs/method.md).

Layers 0..N−1 are split into contiguous steps of 1..P layers. A step of s layers costs
`step_latency[s]` (measured on the target device: a fused group of s layers is cheaper than s
sequential layers but dearer than one) and, for s ≥ 2, a quality cost (the measured KL of that
group made concurrent alone, from `cqil analyze`). The program finds the partitions of least
total quality cost whose latency fits the budget, keeping the K best so that the caller can
re-measure them whole (costs are close to additive, not exactly).

Latency is discretised to `resolution` of the budget (default 1/2000), which keeps the table at
N × 2000 × K entries: small for N ≤ 128.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from ..core.errors import CqilError


@dataclass(frozen=True)
class Partition:
    steps: tuple[tuple[int, ...], ...]
    cost: float  # summed group KL (predicted)
    latency: float  # summed step latency, same unit as step_latency

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def groups(self) -> list[list[int]]:
        return [list(s) for s in self.steps]

    def spec(self) -> str:
        grouped = [f"{s[0]}-{s[-1]}" for s in self.steps if len(s) > 1]
        return ",".join(grouped) or "none"


def best_partitions(num_layers: int, max_group_size: int, step_latency: dict[int, float],
                    group_cost: dict[tuple[int, ...], float], latency_budget: float,
                    keep: int = 5, resolution: int = 2000) -> list[Partition]:
    """The `keep` cheapest partitions whose summed step latency is ≤ latency_budget.

    step_latency[s]: latency of one step of s layers (s = 1..max_group_size).
    group_cost[(i, …, j)]: quality cost of grouping layers i..j (s ≥ 2); a missing group is not
    allowed. Raises CqilError when no partition fits, naming the best reachable latency.
    """
    if max_group_size < 1:
        raise CqilError("the largest group size must be at least 1")
    sizes = [s for s in range(1, max_group_size + 1) if s in step_latency]
    if all(float(step_latency[s]).is_integer() for s in sizes) and \
            float(latency_budget).is_integer():
        resolution = int(latency_budget)  # integer costs (e.g. counting steps): exact, unit 1
    unit = latency_budget / resolution
    # Latency in integer units; round up so that a partition that fits here fits for real.
    lat_units = {s: max(1, math.ceil(step_latency[s] / unit - 1e-9)) for s in sizes}
    limit = resolution

    # table[i]: {latency units used: [(cost, prev_i, prev_units, prev_rank, step)] K best}
    table: list[dict[int, list]] = [dict() for _ in range(num_layers + 1)]
    table[0][0] = [(0.0, -1, -1, -1, ())]
    for i in range(num_layers):
        for used, entries in table[i].items():
            for s in sizes:
                j = i + s
                if j > num_layers:
                    break
                step = tuple(range(i, j))
                cost = 0.0 if s == 1 else group_cost.get(step)
                if cost is None:
                    continue
                new_used = used + lat_units[s]
                if new_used > limit:
                    continue
                bucket = table[j].setdefault(new_used, [])
                for rank, entry in enumerate(entries):
                    bucket.append((entry[0] + cost, i, used, rank, step))
        for j in range(i + 1, min(num_layers, i + max_group_size) + 1):
            for used in table[j]:
                table[j][used] = heapq.nsmallest(keep, table[j][used], key=lambda e: e[0])

    finals = [(entry[0], used, rank) for used, entries in table[num_layers].items()
              for rank, entry in enumerate(entries)]
    if not finals:
        fastest = fastest_latency(num_layers, sizes, step_latency, group_cost)
        raise CqilError(f"the budget cannot be met: it allows {latency_budget:.4g} for the "
                        f"layers, the fastest grouping with groups of at most {max_group_size} needs "
                        f"{fastest:.4g}")
    results = []
    for cost, used, rank in sorted(finals)[:keep]:
        steps = []
        i, u, r = num_layers, used, rank
        while i > 0:
            _, prev_i, prev_u, prev_r, step = table[i][u][r]
            steps.append(step)
            i, u, r = prev_i, prev_u, prev_r
        steps.reverse()
        latency = sum(step_latency[len(s)] for s in steps)
        results.append(Partition(tuple(steps), cost, latency))
    return results


def fastest_latency(num_layers: int, sizes: list[int], step_latency: dict[int, float],
                    group_cost: dict[tuple[int, ...], float] | None = None) -> float:
    """The least summed step latency of any partition into steps of the given sizes (only
    groups listed in group_cost, unless it is None)."""
    best = [0.0] + [math.inf] * num_layers
    for j in range(1, num_layers + 1):
        for s in sizes:
            i = j - s
            if i < 0:
                continue
            if s > 1 and group_cost is not None and tuple(range(i, j)) not in group_cost:
                continue
            best[j] = min(best[j], best[i] + step_latency[s])
    return best[num_layers]


def uniform_groups(start: int, end: int, size: int, num_layers: int) -> list[list[int]]:
    """The papers' notation: consecutive groups of `size` from `start` to `end` (exclusive)."""
    if not 0 <= start < end <= num_layers:
        raise CqilError(f"bad range --start {start} --end {end}: need 0 ≤ start < end ≤ "
                        f"{num_layers}")
    if size < 1:
        raise CqilError(f"bad --group-size {size}: it must be at least 1")
    if (end - start) % size:
        raise CqilError(f"--end − --start = {end - start} is not a multiple of --group-size {size}")
    steps = [[i] for i in range(start)]
    steps += [list(range(i, i + size)) for i in range(start, end, size)]
    steps += [[i] for i in range(end, num_layers)]
    return steps
