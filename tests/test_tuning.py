"""Tuning on the runtime's steps (teacher = the original, student = the reference engine), and
the evaluation helpers (perplexity, grouping_kl) against the metrics computed directly."""

from __future__ import annotations

import pytest
import tiny_models
import torch
import torch.nn.functional as F

from cqil_cli.calibrate.evaluate import grouping_kl, perplexity
from cqil_cli.calibrate.tuning import (
    LoRALinear,
    TuneOptions,
    detach_lora,
    teacher_and_student,
    tune_from_teacher,
    tune_groups,
    tune_skip,
)
from cqil_cli.core.metrics import mean_kl
from cqil_cli.runtime.checkpoint import build_cqil_model

REL_TOL = 1e-5  # fp32, max |difference| / max |reference|
# A few optimizer steps, deterministic: fp32 (no bf16 autocast), larger rates than the defaults.
FEW_STEPS = TuneOptions(steps=6, minutes=None, lora_rank=4, lr_bypass=1e-2, lr_lora=1e-2,
                        batch_size=4, precision="fp32", seed=0)
GROUPINGS = {  # family -> steps; the first has single layers before its first group, the second none
    "llama-gqa": [[0], [1, 2], [3, 4]],
    "qwen3-qknorm": [[0, 1], [2], [3, 4, 5], [6]],
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def token_ids(model, batch: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", sorted(GROUPINGS))
def test_teacher_is_the_original_and_student_the_reference_forward(family):
    base = tiny_models.tiny_model(family, seed=0)
    model = build_cqil_model(base, GROUPINGS[family], 1)
    ids = token_ids(model)
    tune_groups(model, ids, FEW_STEPS)  # trained bypass weights and LoRA attached: both matter
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        teacher, student = teacher_and_student(model, ids)
    assert rel(teacher, logits_of(base, ids)) < REL_TOL
    model.set_engine("reference")  # the fused engine does not see unmerged adapters
    assert rel(student, logits_of(model, ids)) < REL_TOL
    assert rel(student, teacher) > 1e-3  # the grouping does change the output


def test_a_few_steps_lower_the_kl_on_the_calibration_batch():
    model = build_cqil_model(tiny_models.tiny_model("llama-gqa", seed=0), GROUPINGS["llama-gqa"], 1)
    ids = token_ids(model)
    with torch.no_grad():
        before = mean_kl(*teacher_and_student(model, ids)).item()
    result = tune_groups(model, ids, FEW_STEPS)
    with torch.no_grad():
        after = mean_kl(*teacher_and_student(model, ids)).item()
    assert result.steps == len(result.losses) == FEW_STEPS.steps
    assert result.losses[0] == pytest.approx(before, rel=1e-5)  # every batch is the whole set
    assert after < 0.9 * before
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert all(p.grad is None for p in model.parameters())  # no gradient memory left behind


@pytest.mark.parametrize("family", sorted(GROUPINGS))
def test_the_checkpointed_chunked_loss_has_the_gradient_of_the_plain_one(family):
    """What tune_groups trains on (each step recomputed in the backward, the KL through the head
    in chunks) has the loss and gradients of the plain KL of the two models' logits."""
    from cqil_cli.calibrate.tuning import (
        attach_lora,
        bypass_parameters,
        teacher_and_student_hidden,
    )
    from cqil_cli.core.metrics import mean_kl_of_hidden

    model = build_cqil_model(tiny_models.tiny_model(family, seed=0), GROUPINGS[family], 1)
    for p in model.parameters():
        p.requires_grad_(False)
    grouped = [i for g in GROUPINGS[family] if len(g) > 1 for i in g]
    adapters = attach_lora(model, grouped, 4)
    trained = bypass_parameters(model) + [p for a in adapters for p in (a.lora_a, a.lora_b)]
    with torch.no_grad():
        for a in adapters:
            a.lora_b.normal_()  # non-zero, so every adapter weight has a gradient
    for p in trained:
        p.requires_grad_(True)
    ids = token_ids(model)
    plain = mean_kl(*teacher_and_student(model, ids))
    want = torch.autograd.grad(plain, trained)
    teacher, student = teacher_and_student_hidden(model, ids, checkpointed=True)
    loss = mean_kl_of_hidden(teacher, student, model.compute_logits)
    got = torch.autograd.grad(loss, trained)
    assert rel(loss, plain) < REL_TOL
    for g, w in zip(got, want, strict=True):
        assert rel(g, w) < REL_TOL


def test_merging_keeps_the_tuned_model():
    model = build_cqil_model(tiny_models.tiny_model("llama-gqa", seed=0), GROUPINGS["llama-gqa"], 1)
    ids = token_ids(model)
    tune_groups(model, ids, FEW_STEPS)
    model.set_engine("reference")
    tuned = logits_of(model, ids)
    detach_lora(model, merge=True)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    model.set_engine("fused")
    assert rel(logits_of(model, ids), tuned) < REL_TOL


def test_a_model_without_groups_is_left_unchanged():
    model = build_cqil_model(tiny_models.tiny_model("llama-gqa", seed=0), None, 0)
    ids = token_ids(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = tune_groups(model, ids, FEW_STEPS)
    assert result.steps == 0 and result.losses == []
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_tuning_needs_a_bound():
    from cqil_cli.core.errors import CqilError

    model = build_cqil_model(tiny_models.tiny_model("llama-gqa", seed=0), GROUPINGS["llama-gqa"], 1)
    with pytest.raises(CqilError, match="bound"):
        tune_groups(model, token_ids(model), TuneOptions(steps=None, minutes=None))


def test_lora_only_tunings_lower_their_kl():
    """tune_from_teacher (a separate teacher) and tune_skip (the skip model's own prompt pass)."""
    teacher = tiny_models.tiny_model("llama-gqa", seed=0)
    student = tiny_models.tiny_model("llama-gqa", seed=1)
    ids = token_ids(teacher)
    result = tune_from_teacher(teacher, student, [0, 2, 4], ids, FEW_STEPS)
    assert result.steps == FEW_STEPS.steps and result.losses[-1] < result.losses[0]

    skip = build_cqil_model(teacher, None, 0, skip_layers=[2, 3])
    result = tune_skip(skip, [1, 4], ids, FEW_STEPS, prompt_tokens=8)
    assert result.steps == FEW_STEPS.steps and result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("prompt_tokens", [0, 5])
def test_perplexity_is_exp_of_the_mean_next_token_nll(prompt_tokens):
    model = tiny_models.tiny_model("qwen2-bias", seed=0)
    ids = token_ids(model, batch=5)
    logits = logits_of(model, ids)  # [5, 16, V]
    start = max(prompt_tokens - 1, 0)
    nll = F.cross_entropy(logits[:, start:-1].flatten(0, 1), ids[:, start + 1:].flatten())
    # batch_size 2: uneven batches (2, 2, 1) weigh by tokens, not by batch
    got = perplexity(model, ids, batch_size=2, prompt_tokens=prompt_tokens)
    assert got == pytest.approx(nll.exp().item(), rel=1e-5)


def test_grouping_kl_is_the_mean_per_token_kl_of_the_untuned_grouping():
    base = tiny_models.tiny_model("llama-gqa", seed=0)
    ids = token_ids(base, batch=3)
    grouped = build_cqil_model(base, GROUPINGS["llama-gqa"], 1)
    direct = mean_kl(logits_of(base, ids), logits_of(grouped, ids)).item()
    assert grouping_kl(base, GROUPINGS["llama-gqa"], 1, ids, batch_size=2) == \
        pytest.approx(direct, rel=1e-5)
    assert grouping_kl(base, None, 0, ids) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- LoRA targets

LORA_FAMILIES = ("phi3-partial", "gemma2-softcap")  # fused projections; q/k/v with post-norms


@pytest.mark.parametrize("kind", ["llama-gqa", *LORA_FAMILIES])
def test_lora_wraps_the_linear_modules_each_layer_has(kind):
    """Phi-3's fused qkv_proj and gate_up_proj, else q/k/v and gate/up; o and down always;
    on transformers' layers and on cqil's alike. A layer with none of them: a clear error."""
    from cqil_cli.calibrate.tuning import attach_lora_to, lora_targets
    from cqil_cli.core.errors import CqilError

    fused = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    split = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    want = fused if kind.startswith("phi3") else split
    base = tiny_models.tiny_model(kind, seed=0)
    cqil = build_cqil_model(base, None, 0)
    for layer in (base.model.layers[1], cqil.model.layers[1]):
        assert lora_targets(layer) == want
        adapters = attach_lora_to([layer], rank=2)
        assert [isinstance(layer.get_submodule(t), LoRALinear) for t in want] == [True] * len(want)
        assert len(adapters) == len(want)
    with pytest.raises(CqilError, match=r"LoRA: layer 0 \(Linear\) has none"):
        attach_lora_to([torch.nn.Linear(4, 4)], rank=2)


@pytest.mark.parametrize("kind", LORA_FAMILIES)
def test_merged_lora_reaches_the_fused_engine(kind):
    """LoRA on fused (Phi-3) and split (Gemma 2) projections of a model whose fused engine has
    already packed its weights (the parameters are views of its step buffers): after tuning and
    detach_lora(merge=True), the fused engine computes the tuned model."""
    model = build_cqil_model(tiny_models.tiny_model(kind, seed=0), [[0], [1, 2], [3, 4]], 1)
    ids = token_ids(model)
    untuned = logits_of(model, ids)  # fused: packs the step buffers
    tune_groups(model, ids, FEW_STEPS)
    model.set_engine("reference")
    tuned = logits_of(model, ids)
    detach_lora(model, merge=True)
    model.set_engine("fused")
    assert rel(logits_of(model, ids), tuned) < REL_TOL
    assert rel(tuned, untuned) > 1e-3


@pytest.mark.parametrize("kind", LORA_FAMILIES)
def test_convert_with_lora_tuning_writes_the_tuned_model(kind, tmp_path, tokenizer_dir,
                                                         monkeypatch):
    """`cqil convert` with LoRA in both stages (the local stage's --local-params lora,
    calibrate/reconstruct.py, and the end-to-end stage): the merged weights differ from the
    original's, and the written folder gives the logits of the model the pipeline held."""
    from conftest import run_cqil
    from test_gguf import quick_latency, small_text

    from cqil_cli.convert import pipeline
    from cqil_cli.inputs.models import load_model
    from cqil_cli.runtime.manifest import read_manifest

    quick_latency(monkeypatch)
    held = {}
    write_output = pipeline.write_output

    def keep_and_write(model, *args, **kwargs):
        held["model"] = model
        return write_output(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "write_output", keep_and_write)
    base = tiny_models.save_tiny(kind, tmp_path / "base", tokenizer_dir=tokenizer_dir)
    out, text_file = tmp_path / "out", small_text(tmp_path)
    result = run_cqil("convert", base, "--out", out, "--groups", "1-2", "--bypass", "1",
                      "--local-params", "lora", "--local-windows", "4", "--tune-steps", "3", "--lora-rank", "2",
                      "--calib", text_file, "--eval", text_file, "--eval-ood", "none",
                      "--device", "cpu")
    assert result.code == 0, result.err[-2000:]
    stages = read_manifest(out).tuning["stages"]
    assert [(s["name"], s["steps"]) for s in stages] == [("local", 3), ("e2e", 3)]
    # kept if held-out perplexity improved; at least one, else nothing of the tuning was written
    # (with these seeds: Phi-3 keeps the local stage, Gemma 2 the end-to-end one)
    assert any(s["kept"] for s in stages)
    model = held["model"]
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # merged
    original = tiny_models.tiny_model(kind, seed=0)
    for name, weight in original.model.layers[1].named_parameters():
        if name.endswith("proj.weight"):
            tuned = model.model.layers[1].get_parameter(name)
            assert rel(tuned, weight) > 1e-4, name  # LoRA reached every targeted matrix
    ids = token_ids(model, batch=2, length=12)
    assert model.config.engine == "fused"
    assert rel(logits_of(load_model(str(out)).model, ids), logits_of(model, ids)) < REL_TOL
