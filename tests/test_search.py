"""The grouping search against brute force on small random problems."""

import random

import pytest

from cqil_cli.core.errors import CqilError
from cqil_cli.search.partitions import best_partitions, uniform_groups


def all_partitions(n, max_size, i=0):
    if i == n:
        yield []
        return
    for s in range(1, max_size + 1):
        if i + s <= n:
            for rest in all_partitions(n, max_size, i + s):
                yield [tuple(range(i, i + s))] + rest


@pytest.mark.parametrize("seed", range(8))
def test_dynamic_program_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    n, max_size = rng.randint(4, 9), rng.randint(2, 4)
    step_latency = {1: 1.0, **{s: 1.0 + 0.25 * (s - 1) + rng.random() * 0.1
                               for s in range(2, max_size + 1)}}
    cost = {tuple(range(i, i + s)): rng.random()
            for s in range(2, max_size + 1) for i in range(n - s + 1)}
    budget = n * rng.uniform(0.6, 0.95)
    feasible = []
    for p in all_partitions(n, max_size):
        latency = sum(step_latency[len(t)] for t in p)
        if latency <= budget * (1 - 1e-3):  # well inside the budget despite discretisation
            feasible.append(sum(cost[t] for t in p if len(t) > 1))
    if not feasible:
        return
    found = best_partitions(n, max_size, step_latency, cost, budget, keep=3, resolution=20000)
    assert found[0].cost == pytest.approx(min(feasible))
    assert [p.cost for p in found] == sorted(p.cost for p in found)
    for p in found:
        assert sum(step_latency[len(t)] for t in p.steps) <= budget + 1e-9
        assert [layer for step in p.steps for layer in step] == list(range(n))


def test_impossible_budget_names_the_best_reachable_figure():
    with pytest.raises(CqilError, match=r"cannot be met.*needs 3"):
        best_partitions(4, 2, {1: 1.0, 2: 1.5}, {(0, 1): 0.1, (1, 2): 0.1, (2, 3): 0.1}, 2.0)


def test_papers_notation():
    steps = uniform_groups(14, 26, 2, 30)
    assert [s for s in steps if len(s) > 1] == [[14, 15], [16, 17], [18, 19], [20, 21],
                                                [22, 23], [24, 25]]
    assert len(steps) == 24
    with pytest.raises(CqilError):
        uniform_groups(14, 25, 2, 30)


def test_counting_steps_is_exact():
    n = 30
    cost = {(i, i + 1): 1.0 + i / 100 for i in range(n - 1)}
    found = best_partitions(n, 2, {1: 1.0, 2: 1.0}, cost, 24.0, keep=1)
    assert found[0].num_steps == 24  # 6 pairs, not 7: an exact fit must not be rounded away
