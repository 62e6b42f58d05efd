"""The local (block-wise) reconstruction stage (calibrate/reconstruct.py) and its place in convert:
the blocks of each strategy compute what their models compute, the stage lowers the block error,
leaves an already exact block alone, feeds each block the repaired model's activations, and
convert keeps a stage only if it helps."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import tiny_models
import torch
from tiny_models import rel

from cqil_cli.calibrate.options import LocalOptions
from cqil_cli.calibrate.reconstruct import LocalResult, reconstruct, restore
from cqil_cli.calibrate.tuning import LoRALinear
from cqil_cli.convert.strategies import remove_layers
from cqil_cli.convert.strategy_blocks import cqil_blocks, prune_blocks, repair_units, skip_blocks
from cqil_cli.core.errors import CqilError
from cqil_cli.runtime.checkpoint import build_cqil_model

TOL = 1e-5  # fp32, relative
# A few deterministic steps: fp32, a larger rate than the default for a random tiny model.
FEW = LocalOptions(steps=8, minutes=None, closed_form=False, lr_full=1e-3, lr_lora=1e-2,
                   lora_rank=4, batch_size=4, samples=8, precision="fp32", seed=0)
STEPS = [[0], [1, 2], [3], [4, 5], [6]]  # two groups with a single layer between (7 layers)


def windows(count: int = 8, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, tiny_models.VOCAB_SIZE, (count, length), generator=generator)


def hidden(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Hidden states of a transformers model: [0] the embeddings, [i] after layer i - 1 (the
    last one after the final norm as well)."""
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def block_error(block, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((block.student(x) - y).pow(2).sum() / (y - x).pow(2).sum())


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_repair_units_cover_each_removed_run_once():
    assert repair_units(7, [0, 1, 4, 6]) == [(2, 5, 4), (5, 7, 6)]
    assert repair_units(6, [0, 2, 3]) == [(1, 3, 2), (3, 6, 3)]  # a run at the end: before it
    assert repair_units(5, [2, 3, 4]) == [(0, 3, 2)]  # a run at the start: the embeddings feed it
    assert repair_units(4, [0, 1, 2, 3]) == []


def test_blocks_compute_what_their_models_compute():
    base = tiny_models.tiny_model("qwen3-qknorm", seed=0)
    ids = windows()
    reference = hidden(base, ids)  # the original model: every layer in sequence

    grouped = build_cqil_model(base, STEPS, 1)
    blocks = cqil_blocks(grouped, ids)
    assert [b.name for b in blocks.blocks] == ["layers 1-2", "layers 4-5"]
    with torch.no_grad():
        x = blocks.first_input(ids)
        assert rel(x, reference[1]) < TOL
        assert rel(blocks.blocks[0].original(x), reference[3]) < TOL  # layers 1, 2 in sequence
        inner = grouped.model
        states = []
        inner.run_steps(inner.prepare_steps(ids)[0], inner.prepare_steps(ids[:1])[1],
                        hidden_states=states)
        s = blocks.blocks[0].student(x)
        assert rel(s, states[1]) < TOL  # the group, as the grouped model runs it
        assert rel(blocks.blocks[0].after(s), states[2]) < TOL  # then layer 3: block 2's input

    kept = [0, 1, 4, 6]
    pruned = copy.deepcopy(base)
    remove_layers(pruned, kept)
    blocks = prune_blocks(base, pruned, kept, ids)
    pruned_states = hidden(pruned, ids)
    with torch.no_grad():
        x = blocks.first_input(ids)
        assert rel(x, pruned_states[2]) < TOL  # the input of kept layer 4 (new index 2)
        assert rel(blocks.blocks[0].student(x), pruned_states[3]) < TOL
        assert rel(blocks.blocks[0].original(reference[2]), reference[5]) < TOL  # layers 2-4
        last = base.model.norm(blocks.blocks[1].original(reference[5]))  # layers 5-6, the norm
        assert rel(last, reference[7]) < TOL  # (transformers' last hidden state is normed)

    skip = build_cqil_model(base, None, 0, skip_layers=[2, 3, 5])
    blocks = skip_blocks(skip, 10, ids)
    with torch.no_grad():
        x = blocks.first_input(ids)
        assert rel(blocks.blocks[0].original(x), reference[5]) < TOL  # every token, every layer
        s = blocks.blocks[0].student(x)
        assert rel(s[:, :10], reference[5][:, :10]) < TOL  # the prompt: through every layer
        assert rel(s[:, 10:], reference[5][:, 10:]) > 1e-3  # the continuation skips 2 and 3


@pytest.mark.parametrize("params", ["full", "lora"])
def test_the_local_stage_lowers_the_block_error(params):
    base = tiny_models.tiny_model("llama-gqa", seed=0)
    ids = windows()
    model = build_cqil_model(base, [[0], [1, 2], [3, 4]], 1)
    blocks = cqil_blocks(model, ids)
    reference = hidden(base, ids)
    before = block_error(blocks.blocks[0], reference[1], reference[3])
    result = reconstruct(blocks, ids, LocalOptions(**{**FEW.__dict__, "params": params}))
    assert result.steps == 2 * FEW.steps and [b["steps"] for b in result.blocks] == [8, 8]
    first = result.blocks[0]
    assert first["loss_start"] == pytest.approx(before, rel=1e-4)
    assert "kept" not in first  # training itself lowered the error: nothing was undone
    after = block_error(blocks.blocks[0], reference[1], reference[3])  # block 1's input: as before
    assert after < 0.9 * before and first["loss_end"] == pytest.approx(after, rel=1e-4)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # merged
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # a block's worth of memory each
    restore(result)  # the caller's undo: exactly the weights of before
    fresh = build_cqil_model(base, [[0], [1, 2], [3, 4]], 1)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_the_closed_form_start_is_least_squares():
    base = tiny_models.tiny_model("llama-gqa", seed=0)
    ids = windows()
    model = build_cqil_model(base, [[0], [1, 2], [3, 4]], 1)
    blocks = cqil_blocks(model, ids)
    reference = hidden(base, ids)
    options = LocalOptions(**{**FEW.__dict__, "steps": 0, "closed_form": True, "ridge": 1e-3})
    result = reconstruct(blocks, ids, options)
    first = result.blocks[0]
    assert first["closed_form"].startswith("least squares")
    measured = block_error(blocks.blocks[0], reference[1], reference[3])
    assert first["loss_end"] == pytest.approx(measured, rel=1e-4)
    predicted = float(first["closed_form"].rsplit("-> ", 1)[1].rstrip(")"))
    assert predicted == pytest.approx(measured, rel=1e-3)  # the analytic error, no extra pass
    assert measured < 0.5 * first["loss_start"]


def test_a_group_equal_to_its_sequential_layers_stays_equal():
    base = tiny_models.tiny_model("llama-gqa", seed=0)
    with torch.no_grad():  # layer 2 adds nothing: the group 1-2 is exactly layer 1 then layer 2
        base.model.layers[2].self_attn.o_proj.weight.zero_()
        base.model.layers[2].mlp.down_proj.weight.zero_()
    ids = windows()
    model = build_cqil_model(base, [[0], [1, 2], [3], [4]], 1)
    before = state(model)
    blocks = cqil_blocks(model, ids)
    result = reconstruct(blocks, ids, LocalOptions(**{**FEW.__dict__, "closed_form": True}))
    assert result.blocks[0]["loss_start"] < 1e-10
    assert result.blocks[0]["loss_end"] <= result.blocks[0]["loss_start"]
    for name, value in model.state_dict().items():  # (o_proj and down_proj of layer 2: zeros)
        assert (value - before[name]).abs().max() <= TOL * max(1.0, before[name].abs().max()), name
    reference = hidden(base, ids)
    with torch.no_grad():
        assert rel(blocks.blocks[0].student(reference[1]), reference[3]) < TOL


def test_each_block_is_fed_the_repaired_model():
    base = tiny_models.tiny_model("qwen3-qknorm", seed=0)
    ids = windows()
    model = build_cqil_model(base, STEPS, 1)
    inner = model.model
    context = inner.prepare_steps(ids[:1])[1]

    def input_of_second_group():  # [n, T, d] before step 3 (layers 4-5) of the model as it is
        with torch.no_grad():
            return inner.run_steps(inner.prepare_steps(ids)[0], context, steps=range(3))

    unrepaired = input_of_second_group()
    blocks = cqil_blocks(model, ids)
    seen = []
    original = blocks.blocks[1].original
    blocks.blocks[1].original = lambda x: seen.append(x) or original(x)
    reconstruct(blocks, ids, FEW)
    fed = torch.cat(seen)
    assert rel(fed, input_of_second_group()) < TOL  # the model with block 1 repaired
    assert rel(fed, unrepaired) > 1e-3  # which differs from the unrepaired model


def test_skip_and_prune_blocks_train():
    base = tiny_models.tiny_model("llama-gqa", seed=0)
    ids = windows()
    kept = [0, 3, 4]
    pruned = copy.deepcopy(base)
    remove_layers(pruned, kept)
    result = reconstruct(prune_blocks(base, pruned, kept, ids), ids, FEW)
    assert [b["name"] for b in result.blocks] == ["layers 1-3 -> 3"]
    assert result.blocks[0]["loss_end"] < 0.9 * result.blocks[0]["loss_start"]
    skip = build_cqil_model(base, None, 0, skip_layers=[1, 2])
    result = reconstruct(skip_blocks(skip, 12, ids), ids, FEW)
    assert result.blocks[0]["loss_end"] < 0.9 * result.blocks[0]["loss_start"]


def test_convert_keeps_a_stage_only_if_it_helps(monkeypatch):
    """A local stage that makes held-out perplexity worse is undone exactly; one that improves
    it is kept."""
    from cqil_cli.calibrate import reconstruct as module
    from cqil_cli.calibrate.tuning import ParameterBackup
    from cqil_cli.convert import pipeline

    base = tiny_models.tiny_model("llama-gqa", seed=0)
    model = build_cqil_model(base, [[0], [1, 2], [3, 4]], 1)
    before = state(model)

    class Scorer:  # a stand-in "perplexity": 10 for the untuned weights, 10 ± change otherwise
        ood_ids = None
        sign = 1.0

        def held_out(self, m):
            change = sum(float((v - before[k]).abs().sum()) for k, v in m.state_dict().items())
            return 10.0 + self.sign * change

        def out_of_domain(self, m):
            return 2 * self.held_out(m)

        def __call__(self, m):
            return self.held_out(m), self.out_of_domain(m)

    def changing(blocks, calib_ids, options, on_step=None, on_block=None):
        result = LocalResult(steps=3, seconds=1.0, saved=ParameterBackup())
        for k, block in enumerate(blocks.blocks):
            for p in (p for layer in block.layers for p in layer.parameters()):
                result.saved.add([p])
                with torch.no_grad():
                    p.mul_(1.5)
            on_block(k, {})
        return result

    monkeypatch.setattr(module, "reconstruct", changing)
    ids = windows()
    conversion = pipeline.Conversion(model, [[0], [1, 2], [3, 4]], {}, tune=None, plain=False,
                                     blocks=lambda: cqil_blocks(model, ids))
    opts = pipeline.ConvertOptions(out=Path("unused"), tune_stages="local", tune_steps=1)
    scorer = Scorer()
    tuned, record = pipeline._tune_stages(conversion, opts, scorer(model), scorer, ids,
                                          pipeline.Callbacks())
    stage = record["stages"][0]
    assert stage["name"] == "local" and not stage["kept"] and not record["kept"]
    assert stage["ppl"] > 10.0 and stage["ppl_ood"] == 2 * stage["ppl"] and stage["steps"] == 3
    assert tuned == (10.0, 20.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    scorer.sign = -1.0  # now every change is an improvement
    tuned, record = pipeline._tune_stages(conversion, opts, scorer(model), scorer, ids,
                                          pipeline.Callbacks())
    assert record["stages"][0]["kept"] and tuned[0] < 10.0
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_end_to_end_stage_whose_merge_loses_is_undone_bit_for_bit(dtype):
    """The e2e stage is judged again after merging its adapters (merging rounds every weight it
    touches): a merge that loses the gain is undone from the on-disk backup, exactly."""
    from cqil_cli.calibrate.tuning import LoRALinear, ParameterBackup, tune_groups
    from cqil_cli.convert import pipeline

    base = tiny_models.tiny_model("llama-gqa", seed=0).to(dtype)
    model = build_cqil_model(base, [[0], [1, 2], [3, 4]], 1)
    ids = windows()
    before = state(model)

    class Scorer:  # unmerged adapters look better (9), the merged weights worse (11)
        ood_ids = None

        def held_out(self, m):
            if any(isinstance(x, LoRALinear) for x in m.modules()):
                return 9.0
            same = all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
            return 10.0 if same else 11.0

        def out_of_domain(self, m):
            return self.held_out(m)

        def __call__(self, m):
            return self.held_out(m), self.out_of_domain(m)

    conversion = pipeline.Conversion(
        model, [[0], [1, 2], [3, 4]], {}, plain=False, blocks=None,
        tune=lambda tune, on_step, originals=(): tune_groups(model, ids, tune, on_step=on_step,
                                                             originals=originals))
    opts = pipeline.ConvertOptions(out=Path("unused"), tune_stages="e2e", tune_steps=2,
                                   lora_rank=2)
    tuned, record = pipeline._tune_stages(conversion, opts, (10.0, 10.0), Scorer(), ids,
                                          pipeline.Callbacks())
    (stage,) = record["stages"]
    assert stage["name"] == "e2e" and not stage["kept"] and stage["ppl"] == 11.0
    assert tuned == (10.0, 10.0)
    assert not any(isinstance(x, LoRALinear) for x in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    weight = model.model.layers[1].self_attn.q_proj.weight
    backup = ParameterBackup([weight])
    with torch.no_grad():
        weight.add_(1.0)
    backup.restore()
    backup.close()
    assert torch.equal(weight, before["model.layers.1.self_attn.q_proj.weight"])


@pytest.mark.parametrize("stages, message", [("e2e,local", "in that order"),
                                             ("local,local", "in that order"),
                                             ("fast", "--tune-stages"), ("", "--tune-stages")])
def test_bad_tuning_stages_are_refused(tmp_path, stages, message):
    from cqil_cli.convert.options import ConvertOptions

    with pytest.raises(CqilError, match=message):
        ConvertOptions(out=tmp_path / "x", tune_stages=stages).check()
    assert ConvertOptions(out=tmp_path / "x", tune_stages="none").stages == ()
    assert not ConvertOptions(out=tmp_path / "x", tune_stages="none").tunes
    with pytest.raises(CqilError, match="--local-share"):
        ConvertOptions(out=tmp_path / "x", local_share=1.0).check()


@pytest.mark.parametrize("seconds, expected", [(1e-3, 4), (1e9, 64), (None, 64)])
def test_a_time_bound_caches_as_many_windows_as_fit(monkeypatch, seconds, expected):
    """The first batch through the prefix times a layer; the cache holds what fits in the
    share of the time left (a fake clock: that batch takes one second)."""
    import math

    from cqil_cli.calibrate import reconstruct as module

    model = build_cqil_model(tiny_models.tiny_model("qwen3-qknorm", seed=0), STEPS, 1)
    ids = windows(64)
    blocks = cqil_blocks(model, ids)
    assert blocks.prefix == 1 and blocks.layer_passes() == 1 + (4 + 1 + 6) + (4 + 1 + 6)
    ticks = iter([0.0, 1.0])
    monkeypatch.setattr(module.time, "perf_counter", lambda: next(ticks))
    options = LocalOptions(**{**FEW.__dict__, "samples": 64, "cache_batch": 16})
    deadline = math.inf if seconds is None else seconds
    with torch.no_grad():
        x = module._first_inputs(blocks, ids, options, deadline)
    assert x.shape[0] == expected
    with torch.no_grad():
        assert rel(x, blocks.first_input(ids[:expected])) < TOL


def test_a_middling_bound_caches_whole_training_batches(monkeypatch):
    from cqil_cli.calibrate import reconstruct as module

    model = build_cqil_model(tiny_models.tiny_model("qwen3-qknorm", seed=0), STEPS, 1)
    ids = windows(64)
    blocks = cqil_blocks(model, ids)
    ticks = iter([0.0, 1.0])  # 16 windows through 1 layer in 1 s; 23 layer passes per window
    monkeypatch.setattr(module.time, "perf_counter", lambda: next(ticks))
    options = LocalOptions(**{**FEW.__dict__, "samples": 64, "cache_batch": 16})
    with torch.no_grad():
        x = module._first_inputs(blocks, ids, options, deadline=50.0)
    assert x.shape[0] == 24  # 0.75 × 50 s / (23 / 16 s per window) = 26.1, whole batches of 4


def test_the_end_to_end_teacher_runs_the_weights_before_the_local_stage():
    """After the local stage changed the layers' own weights, the e2e stage's teacher (the same
    model run sequentially) must still be the original model: tune_groups' `originals`."""
    from cqil_cli.calibrate.tuning import teacher_and_student

    base = tiny_models.tiny_model("qwen3-qknorm", seed=0)
    ids = windows(4)
    model = build_cqil_model(base, STEPS, 1)
    with torch.no_grad():
        original_teacher, _ = teacher_and_student(model, ids)
    result = reconstruct(cqil_blocks(model, ids), ids, FEW)
    originals = [(p, result.saved.value(p)) for p in result.saved.params]
    changed = {id(p) for p, value in originals if not torch.equal(p, value)}
    assert changed  # the stage did change weights
    with torch.no_grad():
        drifted, _ = teacher_and_student(model, ids)
        teacher, student = teacher_and_student(model, ids, originals)
    assert rel(drifted, original_teacher) > 1e-4  # without originals the teacher moved
    assert rel(teacher, original_teacher) < TOL
    assert all(not torch.equal(p, value) for p, value in originals if id(p) in changed)  # back
    _, student_again = teacher_and_student(model, ids)
    assert rel(student, student_again) < TOL
    with torch.no_grad():  # the same, read from the stage's own file a step at a time
        from_disk, _ = teacher_and_student(model, ids, result.saved)
    assert torch.equal(from_disk, teacher)
