"""`analyze` on tiny random models, checked against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import LLAMA_FAMILY, VOCAB_SIZE, tiny_model

from cqil_cli.analyze.options import AnalyzeOptions
from cqil_cli.analyze.profile import AnalyzeReport, analyze_model, candidate_groups
from cqil_cli.core.errors import CqilError
from cqil_cli.inputs.models import LoadedModel


def _tiny(family: str):
    """A tiny model without a sliding window: the direct computations below call the layers
    without an attention mask (plain causal attention)."""
    return tiny_model(family, **({"sliding_window": None} if family == "mistral-one-kv" else {}))


def _loaded(model, name="tiny"):
    return LoadedModel(model, None, name, name, None, model.config.model_type)


def _layer_inputs(model, ids):
    """Inputs of every layer plus the last layer's output, by calling the layers directly."""
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    pe = inner.rotary_emb(h, pos)
    states = [h]
    for layer in inner.layers:
        h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
        states.append(h)
    return states, pe, pos


def _concurrent_logits(model, ids, group):
    """Direct definition of docs/method.md (no bypass): y = x + Σ_j (layer_j(x) − x)."""
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    pe = inner.rotary_emb(h, pos)
    i = 0
    layers = list(inner.layers)
    while i < len(layers):
        if i == group[0]:
            x = h
            h = x + sum(layers[j](x, attention_mask=None, position_embeddings=pe,
                                  position_ids=pos) - x for j in group)
            i = group[-1] + 1
        else:
            h = layers[i](h, attention_mask=None, position_embeddings=pe, position_ids=pos)
            i += 1
    return model.lm_head(inner.norm(h))


@pytest.mark.parametrize("family", LLAMA_FAMILY)
def test_similarity_and_sensitivity_match_direct_computation(family):
    model = _tiny(family)
    n = model.config.num_hidden_layers
    ids = torch.randint(0, VOCAB_SIZE, (5, 12), generator=torch.Generator().manual_seed(0))
    window = min(3, n)
    with torch.no_grad():
        report = analyze_model(_loaded(model), ids, AnalyzeOptions(window=window, batch_size=2,
                                                                 repeats=1, exact_kl=True))
        states, _, _ = _layer_inputs(model, ids)
        logits = model(ids).logits
    assert report.num_layers == n
    for i in range(n):
        for j in range(n):
            value = report.similarity[i][j]
            if abs(i - j) > window:
                assert value is None
            elif i != j:
                expected = F.cosine_similarity(states[i], states[j], dim=-1).mean().item()
                assert value == pytest.approx(expected, rel=1e-5, abs=1e-6)
                angle = torch.arccos(F.cosine_similarity(states[i], states[j], dim=-1)
                                     .clamp(-1, 1)).mean().item() / math.pi
                assert report.angular_distance[i][j] == pytest.approx(angle, abs=1e-5)
        influence = 1 - F.cosine_similarity(states[i], states[i + 1], dim=-1).mean().item()
        assert report.block_influence[i] == pytest.approx(influence, rel=1e-5, abs=1e-6)

    expected_groups = candidate_groups(n, window)
    assert sorted(r["layers"] for r in report.groups) == sorted(expected_groups)
    log_p = torch.log_softmax(logits, -1)
    for row in report.groups[:4]:
        with torch.no_grad():
            log_q = torch.log_softmax(_concurrent_logits(model, ids, row["layers"]), -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
        assert row["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
        nll_p = -log_p[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
        nll_q = -log_q[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
        assert row["delta_loss"] == pytest.approx(nll_q - nll_p, rel=1e-4, abs=1e-6)
    # Most promising first: ascending KL per saved step.
    per_step = [r["kl_per_saved_step"] for r in report.groups]  # = cost per step with exact_kl
    assert per_step == sorted(per_step)
    latency = report.latency_ms
    assert len(latency["prefill"]) == n and all(t > 0 for t in latency["prefill"])
    assert len(latency["decode"]) == n and all(t > 0 for t in latency["decode"])


def test_results_do_not_depend_on_batch_size():
    model = tiny_model("llama-gqa")
    ids = torch.randint(0, VOCAB_SIZE, (6, 10), generator=torch.Generator().manual_seed(1))
    one = analyze_model(_loaded(model), ids, AnalyzeOptions(window=2, batch_size=1,
                                                            latency=False, exact_kl=True))
    all_ = analyze_model(_loaded(model), ids, AnalyzeOptions(window=2, batch_size=6,
                                                             latency=False, exact_kl=True))
    for a, b in zip(one.groups, all_.groups, strict=True):
        assert a["layers"] == b["layers"]
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-7)
    assert one.similarity[1][2] == pytest.approx(all_.similarity[1][2], rel=1e-5)


def test_other_decoder_only_architectures_work():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=3, n_head=4,
                                       bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, VOCAB_SIZE, (2, 8))
    report = analyze_model(_loaded(model), ids, AnalyzeOptions(window=2, repeats=1))
    assert report.num_layers == 3 and len(report.groups) == 2


def test_a_version_1_report_still_reads_its_kl_as_the_cost():
    """Reports of cqil 0.1 (schema cqil.analyze/1) measured every group by its KL at the output
    and have no local_error or cost: --report keeps reading them."""
    model = tiny_model("llama-gqa")
    ids = torch.randint(0, VOCAB_SIZE, (2, 8), generator=torch.Generator().manual_seed(5))
    report = analyze_model(_loaded(model), ids, AnalyzeOptions(window=2, latency=False,
                                                               exact_kl=True)).to_json()
    old = {k: v for k, v in report.items() if k != "sensitivity_measure"}
    old["schema"] = "cqil.analyze/1"
    old["groups"] = [{k: g[k] for k in ("layers", "size", "kl", "delta_loss",
                                        "kl_per_saved_step", "mean_similarity")}
                     for g in report["groups"]]
    read = AnalyzeReport.from_json(old, "old.json")
    assert read.sensitivity_measure == "output_kl"
    assert read.group_costs(2) == {tuple(g["layers"]): g["kl"] for g in report["groups"]}


def test_bad_window_is_an_error():
    model = tiny_model("mistral-one-kv")
    ids = torch.randint(0, VOCAB_SIZE, (2, 8))
    with pytest.raises(CqilError, match="bad --window"):
        analyze_model(_loaded(model), ids, AnalyzeOptions(window=9))
