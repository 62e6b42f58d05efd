"""analyze's fast sensitivity path (analyze/profile.py's group_sensitivity: recorded layer
calls, shared members, forwards resumed after the group, candidates stacked) against a slow,
obvious reference: a full forward of the model per candidate group, its layers wrapped."""

import pytest
import torch
from tiny_models import VOCAB_SIZE, tiny_model
from torch import nn

from cqil_cli.analyze.options import AnalyzeOptions
from cqil_cli.analyze.probes import hidden_out, proxied_layers
from cqil_cli.analyze.profile import analyze_model, candidate_groups, group_sensitivity
from cqil_cli.core.metrics import log_probs, next_token_nll, token_kl
from cqil_cli.inputs.models import LoadedModel


class _GroupMember(nn.Module):
    """One layer of a concurrent group, inside an ordinary forward of the whole model: every
    member sees the group's input x; the last returns x + Σ_j (layer_j(x) − x)."""

    def __init__(self, inner, shared: dict, first: bool, last: bool):
        super().__init__()
        self.inner, self.shared, self.first, self.last = inner, shared, first, last

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)  # e.g. attention_type

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.first:
            self.shared["x"], self.shared["sum"] = hidden, torch.zeros_like(hidden)
        x = self.shared["x"]
        args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        out = self.inner(*args, **kwargs)
        self.shared["sum"] += hidden_out(out) - x
        if not self.last:
            return out
        y = x + self.shared["sum"]
        return (y, *out[1:]) if isinstance(out, (tuple, list)) else y


@torch.no_grad()
def _slow_sensitivity(model, ids, reference, group):
    """(mean KL, mean NLL change) of `group` made concurrent, by a full forward of the model;
    reference: the original model's log-probabilities [B, T, V]."""
    layers = model.model.layers
    original = list(layers)
    shared: dict = {}
    for j in group:
        layers[j] = _GroupMember(original[j], shared, j == group[0], j == group[-1])
    try:
        grouped = log_probs(model(input_ids=ids, use_cache=False).logits)
    finally:
        for j in group:
            layers[j] = original[j]
    kl = token_kl(reference, grouped).mean().item()
    delta = (next_token_nll(grouped, ids) - next_token_nll(reference, ids)).mean().item()
    return kl, delta


def _loaded(model):
    return LoadedModel(model, None, "tiny", "tiny", None, model.config.model_type)


@pytest.mark.parametrize(("kind", "window"), [("llama-gqa", 5), ("gemma3-local", 3)])
def test_fast_sensitivity_equals_the_slow_reference(kind, window):
    """Every group; llama-gqa with the window at the whole depth (a group from layer 0 to the
    last); gemma3-local's layers get different masks and RoPEs, so each member must be called
    with its own layer's arguments."""
    model = tiny_model(kind)
    n = model.config.num_hidden_layers
    ids = torch.randint(0, VOCAB_SIZE, (3, 16), generator=torch.Generator().manual_seed(2))
    report = analyze_model(_loaded(model), ids, AnalyzeOptions(window=window, batch_size=3,
                                                               latency=False, exact_kl=True))
    assert sorted(r["layers"] for r in report.groups) == sorted(candidate_groups(n, window))
    with torch.no_grad():
        reference = log_probs(model(input_ids=ids, use_cache=False).logits)
    for row in report.groups:
        kl, delta = _slow_sensitivity(model, ids, reference, row["layers"])
        assert row["kl"] == pytest.approx(kl, rel=1e-5, abs=1e-8), row["layers"]
        assert row["delta_loss"] == pytest.approx(delta, rel=1e-5, abs=1e-7), row["layers"]


@torch.no_grad()
def test_stacking_candidates_does_not_change_the_sums():
    """Candidates sharing a last layer, run one by one or stacked along the batch."""
    model = tiny_model("qwen3-qknorm")
    ids = torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(3))
    with proxied_layers(model) as proxies:
        for p in proxies:
            p.record_input = True
        log_p = log_probs(model(input_ids=ids, use_cache=False).logits)
        nll = next_token_nll(log_p, ids)
        inputs = [p.recorded_input for p in proxies] + [hidden_out(proxies[-1].recorded_output)]
        for p in proxies:
            p.record_input = False
        ticks = []
        one = group_sensitivity(model, proxies, ids, inputs, log_p, nll, 4, ticks.append,
                                stack_rows=1)
        local_only = group_sensitivity(model, proxies, ids, inputs, log_p, nll, 4, exact=False)
        stacked = group_sensitivity(model, proxies, ids, inputs, log_p, nll, 4, stack_rows=64)
    assert len(ticks) == len(candidate_groups(len(proxies), 4))  # one tick per candidate
    assert local_only[0] == one[0] and local_only[1:] == ({}, {})
    for sums_one, sums_stacked in zip(one, stacked, strict=True):
        assert sums_one.keys() == sums_stacked.keys()
        for group, value in sums_one.items():
            assert sums_stacked[group] == pytest.approx(value, rel=1e-5, abs=1e-7), group


@torch.no_grad()
def _slow_local_error(model, ids, group) -> float:
    """Mean over tokens of ‖y − x‖² / ‖x‖²: y the group's output with the group made
    concurrent in a full forward, x the original output of its last layer."""
    layers = model.model.layers
    captured = {}

    def keep(name):
        return lambda _module, _args, out: captured.__setitem__(name, hidden_out(out))

    hook = layers[group[-1]].register_forward_hook(keep("x"))
    model(input_ids=ids, use_cache=False)
    hook.remove()
    original = list(layers)
    shared: dict = {}
    for j in group:
        layers[j] = _GroupMember(original[j], shared, j == group[0], j == group[-1])
    hook = layers[group[-1]].register_forward_hook(keep("y"))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
        for j in group:
            layers[j] = original[j]
    x, y = captured["x"], captured["y"]
    return ((y - x).square().sum(-1) / x.square().sum(-1)).mean().item()


@pytest.mark.parametrize("kind", ["llama-gqa", "gemma2-softcap"])
def test_local_error_is_the_default_and_equals_the_slow_reference(kind):
    """The default sensitivity: every group's local error at its own output (no KL, no forward
    after the group), the cost the report sorts by; --exact-kl adds the KL, same local error."""
    model = tiny_model(kind)
    n = model.config.num_hidden_layers
    ids = torch.randint(0, VOCAB_SIZE, (3, 16), generator=torch.Generator().manual_seed(4))
    report = analyze_model(_loaded(model), ids, AnalyzeOptions(window=3, latency=False))
    exact = analyze_model(_loaded(model), ids, AnalyzeOptions(window=3, latency=False,
                                                               exact_kl=True))
    assert report.sensitivity_measure == "local_error" and exact.sensitivity_measure == "output_kl"
    assert sorted(r["layers"] for r in report.groups) == sorted(candidate_groups(n, 3))
    exact_rows = {tuple(r["layers"]): r for r in exact.groups}
    for row in report.groups:
        assert row["kl"] is None and row["delta_loss"] is None and row["cost"] == row["local_error"]
        want = _slow_local_error(model, ids, row["layers"])
        assert row["local_error"] == pytest.approx(want, rel=1e-5, abs=1e-9), row["layers"]
        other = exact_rows[tuple(row["layers"])]
        assert other["local_error"] == pytest.approx(row["local_error"], rel=1e-6)
        assert other["cost"] == other["kl"]
    per_step = [r["cost_per_saved_step"] for r in report.groups]
    assert per_step == sorted(per_step)
    assert report.group_costs(2) == {tuple(r["layers"]): r["local_error"]
                                     for r in report.groups if r["size"] == 2}
