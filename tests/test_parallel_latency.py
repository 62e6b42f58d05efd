"""The alpha-beta latency model of the distributed engine (search/parallel_latency.py)."""

import json
import random

import pytest

from cqil_cli.core.errors import CqilError
from cqil_cli.search.parallel_latency import (
    ALL_GATHER,
    ALL_REDUCE,
    CollectiveCost,
    ComputeCost,
    DecoderShape,
    ParallelLatencyModel,
    collectives_by_key,
    search_latency,
)
from cqil_cli.search.partitions import uniform_groups

D, V, E = 64, 1000, 2  # hidden, vocabulary, bytes per element
ACT = D * E  # one rank's [1, 1, d] activation, batch 1


def make_model(world_size=8):
    """Distinct alphas and betas per (kind, n), so that a wrong count or group shows."""
    costs = []
    for n in (2, 4, 8):
        costs.append(CollectiveCost(ALL_REDUCE, n, 10e-6 * n, 1e-9 * n))
        costs.append(CollectiveCost(ALL_GATHER, n, 7e-6 * n, 3e-9 * n))
    compute = ComputeCost(layer_s={1: 800e-6, 2: 420e-6, 4: 230e-6, 8: 140e-6},
                          head_s={1: 300e-6, 2: 160e-6, 4: 90e-6, 8: 50e-6},
                          embed_s=5e-6, overhead_s=20e-6)
    return ParallelLatencyModel(D, V, E, compute, collectives_by_key(costs), "test")


def test_fit_recovers_alpha_and_beta_from_noisy_repeats():
    rng = random.Random(0)
    alpha, beta = 12e-6, 4e-12
    samples = [(b, alpha + beta * b + rng.gauss(0, 0.2e-6))
               for b in (2 ** k for k in range(10, 25)) for _ in range(5)]
    samples += [(1 << 20, 1.0)]  # one stalled repeat: the median at that size ignores it
    fit = CollectiveCost.fit(samples, kind=ALL_REDUCE, n_ranks=4)
    assert fit.alpha_s == pytest.approx(alpha, rel=0.03)
    assert fit.beta_s_per_byte == pytest.approx(beta, rel=0.01)
    assert (fit.kind, fit.n_ranks) == (ALL_REDUCE, 4)


def test_fit_is_non_negative():
    # Times that fall with size would give a negative beta: the fit keeps beta at 0.
    fit = CollectiveCost.fit([(0, 3e-6), (1000, 2e-6), (2000, 1e-6)], kind=ALL_GATHER, n_ranks=2)
    assert fit.beta_s_per_byte == 0 and fit.alpha_s == pytest.approx(2e-6)
    # A steep line through the origin from above would give a negative alpha: alpha stays 0.
    fit = CollectiveCost.fit([(1000, 0.5e-6), (2000, 2e-6), (3000, 3.5e-6)],
                             kind=ALL_REDUCE, n_ranks=2)
    assert fit.alpha_s == 0 and fit.beta_s_per_byte > 0
    with pytest.raises(CqilError, match="two or more"):
        CollectiveCost.fit([(8, 1e-5), (8, 2e-5)], kind=ALL_REDUCE, n_ranks=2)


def test_bus_bandwidth_matches_nccl_tests_definition():
    ar = CollectiveCost.from_bus_bandwidth(ALL_REDUCE, 8, 0.0, 100e9)
    ag = CollectiveCost.from_bus_bandwidth(ALL_GATHER, 8, 0.0, 100e9)
    assert ar.seconds(1e9) == pytest.approx(2 * 7 / 8 * 1e9 / 100e9)
    assert ag.seconds(1e9) == pytest.approx(7 * 1e9 / 100e9)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_plain_tensor_parallel_is_layers_plus_two_all_reduces_each(world_size):
    model, n, w = make_model(), 12, world_size
    got = model.tensor_parallel_token_s(n, w)
    c = model.compute
    if w == 1:
        expected = n * c.layer_s[1] + c.embed_s + c.head_s[1] + c.overhead_s
        assert got.collectives == 0
    else:
        ar = model.collectives[(ALL_REDUCE, w)].seconds(ACT)
        ag = model.collectives[(ALL_GATHER, w)].seconds(-(-V // w) * E)
        expected = n * (c.layer_s[w] + 2 * ar) + (c.embed_s + ar) + (c.head_s[w] + ag) \
            + c.overhead_s
        assert got.calls == {f"all_reduce/{w}": 2 * n + 1, f"all_gather/{w}": 1}
    assert got.seconds == pytest.approx(expected)
    assert got.seconds == pytest.approx(got.compute_s + got.collective_s)
    assert got.steps == n


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_group_of_w_without_bypass_costs_one_layer_and_one_all_reduce(world_size):
    model, w = make_model(), world_size
    ar = model.collectives[(ALL_REDUCE, w)].seconds(ACT)
    assert model.step_s(w, 0, w) == pytest.approx(model.compute.layer_s[1] + ar)
    assert model.step_collectives(w, 0, w) == [(ALL_REDUCE, w, ACT)]


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("bypass", [0, 1, 3])
def test_collectives_per_step_follow_the_contract(world_size, bypass):
    model, w = make_model(), world_size
    for p in (p for p in (1, 2, 4, 8) if w % p == 0):
        calls = model.step_collectives(p, bypass, w, batch=3)
        act, lane = 3 * ACT, w // p
        if p == 1:
            expected = [(ALL_REDUCE, w, act)] * 2
        elif bypass > 0:
            expected = [(ALL_GATHER, w, act), (ALL_REDUCE, w, act)]
        elif lane > 1:
            expected = [(ALL_REDUCE, lane, act), (ALL_REDUCE, w, act)]
        else:
            expected = [(ALL_REDUCE, w, act)]
        assert calls == expected, (p, bypass, w)
    assert model.outside_collectives(w, batch=3) == [(ALL_REDUCE, w, act),
                                                     (ALL_GATHER, w, 3 * -(-V // w) * E)]


def test_a_grouping_sums_its_steps_and_counts_its_collectives():
    model, w = make_model(), 4
    groups = uniform_groups(2, 10, 2, 12)  # 2 singles, 4 pairs, 2 singles: 8 steps
    got = model.predict_token_s(groups, 1, w)
    expected = model.outside_s(w) + 4 * model.step_s(1, 1, w) + 4 * model.step_s(2, 1, w)
    assert got.seconds == pytest.approx(expected)
    assert got.steps == 8
    # 4 singles x 2 + embedding: all-reduces over 4; 4 pairs: 1 all-gather + 1 all-reduce each.
    assert got.calls == {"all_reduce/4": 4 * 2 + 1 + 4, "all_gather/4": 4 + 1}
    assert got.collectives == sum(got.calls.values())
    tp = model.tensor_parallel_token_s(12, w)
    assert model.ratio(groups, 1, w) == pytest.approx(got.seconds / tp.seconds)


def test_groups_that_do_not_divide_the_ranks_are_refused():
    model = make_model()
    with pytest.raises(CqilError, match="divides"):
        model.predict_token_s([[0], [1, 2, 3]], 0, 4)
    with pytest.raises(CqilError, match="no cost for all_reduce over 3"):
        model.collective_s((ALL_REDUCE, 3, 8))


def test_json_round_trip():
    model = make_model()
    data = json.loads(json.dumps(model.to_json()))
    back = ParallelLatencyModel.from_json(data)
    assert back == model
    groups = uniform_groups(1, 9, 4, 12)
    for w in (4, 8):
        assert back.predict_token_s(groups, 1, w) == model.predict_token_s(groups, 1, w)
    record = json.loads(json.dumps(model.predicted_record(groups, 1, [4, 8])))
    assert set(record["by_world_size"]) == {"4", "8"}
    assert record["by_world_size"]["8"]["ratio"] == pytest.approx(model.ratio(groups, 1, 8))
    assert ParallelLatencyModel.from_json(record["model"]) == model
    with pytest.raises(CqilError, match="not a parallel latency model"):
        ParallelLatencyModel.from_json({"hidden_size": 1})


def test_search_hook_gives_the_search_what_the_model_predicts():
    model, n, w = make_model(), 12, 4
    latency = search_latency(model, n, w, bypass_distance=1)
    assert sorted(latency.step_ms) == [1, 2, 4]  # divisors of W only: 3 cannot run on 4 ranks
    tp = model.tensor_parallel_token_s(n, w).seconds * 1e3
    assert latency.original_ms == pytest.approx(tp)
    for groups in (uniform_groups(2, 10, 2, n), uniform_groups(0, 12, 4, n)):
        assert latency.predict_ms(groups) == pytest.approx(
            model.predict_token_s(groups, 1, w).seconds * 1e3)
    assert sorted(search_latency(model, n, 8, 0, max_group_size=2).step_ms) == [1, 2]


def test_weight_bytes_follow_the_engine_split():
    # 3 kv heads (9 query heads) on 2 ranks: the first rank holds 2 kv heads, 6 query heads.
    shape = DecoderShape("smol", 30, 576, 9, 3, 1536, 49152)
    hd = 64
    assert shape.layer_elements(2) == 576 * hd * (2 * 6 + 2 * 2) + 3 * 576 * 768 + 2 * 576
    assert shape.layer_elements(1, batch=2, context_tokens=10) == \
        576 * hd * (2 * 9 + 2 * 3) + 3 * 576 * 1536 + 2 * 576 + 2 * 10 * 2 * 3 * hd
    cost = shape.compute_cost(4, 2, 1e12, 5e-6, efficiency=0.5)
    assert sorted(cost.layer_s) == [1, 2, 4] and list(cost.head_s) == [4]
    assert cost.layer_s[1] == pytest.approx(5e-6 + 2 * shape.layer_elements(1) / 0.5e12)
    assert cost.head_s[4] == pytest.approx(2 * 576 * (1 + 49152 // 4) / 0.5e12)


def test_search_meets_a_budget_that_is_a_fraction_of_tensor_parallel():
    """What convert/choose.py does with the hook: allowance = fraction x original − outside."""
    from cqil_cli.search.partitions import best_partitions

    model, n, w, fraction = make_model(), 12, 4, 0.85
    latency = search_latency(model, n, w, bypass_distance=1)
    cost = {tuple(range(i, i + s)): 0.1 * s for s in (2, 4) for i in range(n - s + 1)}
    allowance = fraction * latency.original_ms - latency.outside_ms
    found = best_partitions(n, w, latency.step_ms, cost, allowance, keep=2)
    for p in found:
        assert {len(s) for s in p.steps} <= {1, 2, 4}
        assert model.ratio(p.groups(), 1, w) <= fraction + 1e-9


def test_probe_measures_every_input_on_two_ranks():
    """search/parallel_probe.py on 2 local ranks (a tiny Llama's shapes): compute at both
    lane sizes (timed in the running engine), the head, and alpha/beta of every collective the
    engine calls; the model it returns predicts any grouping of the shape."""
    from tiny_models import tiny_model

    from cqil_cli.runtime.checkpoint import build_cqil_model
    from cqil_cli.search.parallel_probe import measure_parallel_model

    config = build_cqil_model(tiny_model("llama-gqa"), "none", 0).config
    model = measure_parallel_model(config, 2, context_tokens=16, repeats=6)
    assert set(model.compute.layer_s) == {1, 2} and model.compute.head_s[2] > 0
    assert all(v >= 0 for v in model.compute.layer_s.values())
    assert {("all_reduce", 2), ("all_gather", 2)} <= set(model.collectives)
    assert "running engine" in model.source
    tp = model.tensor_parallel_token_s(5, 2).seconds
    pairs = model.predict_token_s([[0], [1, 2], [3, 4]], 1, 2).seconds
    assert tp > 0 and pairs > 0


def test_probe_depths_span_the_model_in_multiples_of_every_group_size():
    from cqil_cli.search.parallel_probe import probe_depths

    assert probe_depths(30, 2) == (10, 30)  # the default model on 2 ranks: its own depth
    assert probe_depths(5, 2) == (2, 6)  # a tiny model: at least m and 3m
    for n, m in [(7, 1), (32, 4), (30, 4), (80, 8)]:
        short, deep = probe_depths(n, m)
        assert short % m == 0 and deep % m == 0 and deep >= max(n, 3 * m) and deep > short >= m


# ----------------------------------------------------------------------------- the engine's calls


class CountingCollectives:
    """runtime/distributed_cqil.py's Collectives in one process: records every call as the
    alpha-beta model writes it, (kind, ranks, bytes; per rank for an all-gather), and returns
    tensors of the right shapes (every rank's part taken to be this rank's)."""

    calls: list = []  # the instance the engine made (one engine per test)

    def __init__(self, rank, world_size, lane_sizes=(), native=None):
        self.world_size = world_size
        CountingCollectives.calls = self.calls = []

    def all_gather(self, t, lane_size=None):
        n = lane_size or self.world_size
        self.calls.append((ALL_GATHER, n, t.numel() * t.element_size()))
        return t[None].expand(n, *t.shape).clone()  # [n, *t.shape]

    def all_reduce(self, t, lane_size=None):
        self.calls.append((ALL_REDUCE, lane_size or self.world_size,
                           t.numel() * t.element_size()))
        return t


def engine_calls_per_token(kind: str, groups: str, bypass: int, world: int, monkeypatch):
    """(the collectives rank 0 of the distributed engine calls for one decode token of a tiny
    `kind` model, 4 kv heads, converted with `groups`; its CqilConfig)."""
    import torch
    from tiny_models import tiny_model

    from cqil_cli.runtime import distributed_cqil
    from cqil_cli.runtime.checkpoint import build_cqil_model

    model = build_cqil_model(tiny_model(kind, num_key_value_heads=4), groups, bypass)
    with monkeypatch.context() as patch:  # a process group of `world` ranks, in name only
        patch.setattr(distributed_cqil, "Collectives", CountingCollectives)
        patch.setattr(distributed_cqil.dist, "is_initialized", lambda: True)
        patch.setattr(distributed_cqil.dist, "get_world_size", lambda group=None: world)
        engine = distributed_cqil.DistributedCqil.from_model(model, rank=0, world_size=world)
    engine.forward(torch.tensor([[5]]))  # one token [B=1, T=1]
    return CountingCollectives.calls, model.config


@pytest.mark.parametrize("kind", ["llama-gqa", "gemma2-softcap"])
@pytest.mark.parametrize("groups", ["1-2,3-4", "0-3"])  # lanes of 2 ranks; lanes of 1
@pytest.mark.parametrize("bypass", [0, 1])
def test_the_contract_is_what_the_engine_calls(kind, groups, bypass, monkeypatch):
    """Per token, the collectives the model counts (their kinds, ranks, bytes and order) are
    the ones the engine calls, for a family with post-norms (Gemma 2) and without (Llama)."""
    calls, config = engine_calls_per_token(kind, groups, bypass, 4, monkeypatch)
    model = ParallelLatencyModel(config.hidden_size, config.vocab_size, 4,
                                 ComputeCost({}, {}), {}, post_norms=config.post_norms)
    embedding, head = model.outside_collectives(4)
    steps = [c for g in config.groups for c in model.step_collectives(len(g), bypass, 4)]
    assert calls == [embedding, *steps, head]


def test_post_norm_groups_on_lanes_of_several_ranks_pay_two_lane_all_reduces_more():
    """Gemma's post-norms (DistributedCqil._post_norm_step): a group on lanes of t > 1 ranks
    sums each member's attention and MLP outputs inside its lane before their norms: 3
    collectives per group at D = 0 and 4 at D > 0, against 2 and 2 for the Llama family; single
    layers and groups on lanes of one rank cost the same."""
    from tiny_models import tiny_model

    from cqil_cli.runtime.checkpoint import build_cqil_model

    counts = {}
    for kind in ("llama-gqa", "gemma2-softcap"):
        config = build_cqil_model(tiny_model(kind), "none", 0).config
        model = make_model()
        model.post_norms = config.post_norms
        counts[kind] = {(p, d): len(model.step_collectives(p, d, 8))
                        for p in (1, 2, 8) for d in (0, 1)}
    assert counts["llama-gqa"] == {(1, 0): 2, (1, 1): 2, (2, 0): 2, (2, 1): 2, (8, 0): 1,
                                   (8, 1): 2}
    assert counts["gemma2-softcap"] == {**counts["llama-gqa"], (2, 0): 3, (2, 1): 4}
    gemma = make_model()
    gemma.post_norms = True
    lane = (ALL_REDUCE, 4, ACT)  # pairs on 8 ranks: lanes of 4
    assert gemma.step_collectives(2, 1, 8) == [lane, (ALL_GATHER, 8, ACT), lane,
                                               (ALL_REDUCE, 8, ACT)]
    groups = [[0], [1, 2], [3, 4]]
    assert gemma.predict_token_s(groups, 0, 8).seconds > make_model().predict_token_s(
        groups, 0, 8).seconds
    assert ParallelLatencyModel.from_json(json.loads(json.dumps(gemma.to_json()))) == gemma
