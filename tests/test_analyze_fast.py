"""analyze's fast sensitivity path (calibrate/profile.py's group_sensitivity: recorded layer
calls, shared members, forwards resumed after the group, candidates stacked) against a slow,
obvious reference: a full forward of the model per candidate group, its layers wrapped."""

import pytest
import torch
from tiny_models import VOCAB_SIZE, tiny_model
from torch import nn

from cqil_cli.calibrate.options import AnalyzeOptions
from cqil_cli.calibrate.probes import hidden_out, proxied_layers
from cqil_cli.calibrate.profile import analyze_model, candidate_groups, group_sensitivity
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
                                                               latency=False))
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
        stacked = group_sensitivity(model, proxies, ids, inputs, log_p, nll, 4, stack_rows=64)
    assert len(ticks) == len(candidate_groups(len(proxies), 4))  # one tick per candidate
    for sums_one, sums_stacked in zip(one, stacked, strict=True):
        assert sums_one.keys() == sums_stacked.keys()
        for group, value in sums_one.items():
            assert sums_stacked[group] == pytest.approx(value, rel=1e-5, abs=1e-7), group
