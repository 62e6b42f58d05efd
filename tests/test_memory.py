"""A converted model holds its weights once (docs/runtime.md, "Memory").

The fused engine and fast generation use the parameters' own storage (fused_cqil.pack_members
re-lays each step's matrices out as one buffer with the parameters as views of it), so after
building them the distinct storages of the model add up to its parameter bytes, in-place weight
updates reach the fused engine, and save -> load round-trips.
"""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_models import padded_batch, randomise_bypass, rel, tiny_model

from cqil_cli.runtime.checkpoint import build_cqil_model, load_converted, save_converted
from cqil_cli.runtime.fastgen import FastGenerator
from cqil_cli.runtime.modeling_cqil import CqilForCausalLM

GROUPS = {"llama-gqa": [[0], [1, 2], [3, 4]], "phi3-partial": [[0, 1], [2], [3, 4]],
          "gemma2-softcap": [[0], [1, 2, 3], [4]]}


def _converted(kind: str):
    model = build_cqil_model(tiny_model(kind), GROUPS[kind], 1)
    randomise_bypass(model)
    return model


def _parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once


def _storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def _logits(model, engine: str, ids, mask) -> torch.Tensor:
    model.set_engine(engine)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", sorted(GROUPS))
def test_fused_engine_and_fastgen_hold_the_weights_once(kind):
    model = _converted(kind)
    ids, mask = padded_batch()
    reference = _logits(model, "reference", ids, mask)
    fused = _logits(model, "fused", ids, mask)
    assert rel(fused, reference) < 1e-5
    assert _storage_bytes(model) == _parameter_bytes(model)
    # Every member's q/k/v (or qkv_proj) weight is a view of its step's fused matrix.
    for s, step in enumerate(model.model.fused_steps()):
        buffer = step.qkv.w.untyped_storage().data_ptr()
        for layer in model.model.step_layers(s):
            att = layer.self_attn
            weight = att.qkv_proj.weight if att.fused else att.q_proj.weight
            assert weight.untyped_storage().data_ptr() == buffer
    # Fast generation's head is the parameter too (tied or not).
    generator = FastGenerator(model)
    fast = generator.generate(ids, mask, max_new_tokens=4).tokens
    assert generator._lm_w.w.untyped_storage().data_ptr() == model.lm_head.weight.untyped_storage().data_ptr()
    assert _storage_bytes(model) == _parameter_bytes(model)
    slow = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(fast, slow[:, ids.shape[1]:])
    assert rel(_logits(model, "reference", ids, mask), reference) < 1e-6  # relayout changed nothing


def test_in_place_updates_reach_the_fused_engine():
    model = _converted("llama-gqa")
    ids, mask = padded_batch()
    _logits(model, "fused", ids, mask)  # packs the weights
    steps = model.model.fused_steps()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as an optimizer step would: in place, versions bumped
        for p in model.model.layers.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    assert rel(_logits(model, "fused", ids, mask), _logits(model, "reference", ids, mask)) < 1e-5
    assert model.model.fused_steps()[1].qkv.w.data_ptr() == steps[1].qkv.w.data_ptr()  # no repack
    with torch.no_grad():  # through .data (no version bump): the big matrices are seen at once,
        for layer in model.model.layers:  # the rest after cqil_refresh_fused()
            layer.self_attn.o_proj.weight.data.mul_(1.1)
            if layer.cqil_gamma is not None:
                layer.cqil_gamma.data.mul_(0.9)
    model.cqil_refresh_fused()
    assert rel(_logits(model, "fused", ids, mask), _logits(model, "reference", ids, mask)) < 1e-5


def test_training_after_inference_updates_the_shared_weights():
    model = _converted("llama-gqa")
    ids, mask = padded_batch()
    _logits(model, "fused", ids, mask)
    before = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    optimizer = torch.optim.SGD(model.model.layers[1].parameters(), lr=0.1)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    assert not torch.equal(model.model.layers[1].mlp.up_proj.weight, before)
    assert rel(_logits(model, "fused", ids, mask), _logits(model, "reference", ids, mask)) < 1e-5
    assert _storage_bytes(model) == _parameter_bytes(model)


def test_save_load_round_trip_of_packed_weights(tmp_path):
    model = _converted("llama-gqa")
    ids, mask = padded_batch()
    FastGenerator(model).generate(ids, mask, max_new_tokens=2)  # packs layers and the head
    expected = _logits(model, "fused", ids, mask)
    save_converted(model, None, tmp_path / "out")
    loaded = load_converted(tmp_path / "out")
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert torch.equal(_logits(loaded, "fused", ids, mask), expected)
    assert _storage_bytes(loaded) == _parameter_bytes(loaded)


@pytest.mark.parametrize("kind", ["llama-gqa", "gemma2-softcap"])
def test_building_beside_the_base_shares_or_consumes_it(kind):
    """share_outside_layers: embedding, head and final norm are the base's own parameters;
    consume: the base's tensors are freed as they are copied. Both give the same model."""
    import copy

    base = tiny_model(kind)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = build_cqil_model(base, "1-2", 1)(ids, attention_mask=mask).logits
        shared = build_cqil_model(base, "1-2", 1, share_outside_layers=True)
        assert shared.model.embed_tokens.weight is base.model.embed_tokens.weight
        assert shared.model.norm.weight is base.model.norm.weight
        assert rel(shared(ids, attention_mask=mask).logits, want) == 0
        doomed = copy.deepcopy(base)
        consumed = build_cqil_model(doomed, "1-2", 1, consume=True)
        assert all(p.numel() == 0 for p in doomed.parameters())
        assert rel(consumed(ids, attention_mask=mask).logits, want) == 0
        real = mask.bool()  # the base still works after a shared build (padding: don't-care)
        assert rel(base(ids, attention_mask=mask).logits[real],
                   build_cqil_model(base, None, 0)(ids, attention_mask=mask).logits[real]) < 1e-5


def test_latency_variants_leave_the_base_as_it_was():
    """measure_latency_model's variants share the base's embedding and head, which fast
    generation re-lays out in place: the base gets its ordinary layout and values back."""
    from cqil_cli.search.latency_model import measure_latency_model

    base = tiny_model("llama-gqa")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    measure_latency_model(base, 2, prompt_len=6, new_tokens=2, repeats=1)
    assert all(p.is_contiguous() for p in base.parameters())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_importing_cqil_first_puts_large_tensors_on_huge_pages_unless_told_not_to():
    """cqil sets torch's THP_MEM_ALLOC_ENABLE before torch reads it, and keeps a user's value."""
    import os
    import subprocess
    import sys

    probe = "import os, cqil_cli; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "1"
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "0"


def test_built_model_is_stored_in_the_fused_layout():
    """build_cqil_model(packed=True) fills the fused engine's layout directly: using the fused
    engine then moves no parameter (no second copy of the layers on first use)."""
    model = build_cqil_model(tiny_model("llama-gqa"), "1-2,3-4", 1, packed=True)
    where = {name: p.data_ptr() for name, p in model.named_parameters()}
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 6)))
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == where


def test_save_pretrained_after_the_fused_engine_ran(tmp_path):
    """transformers' own save_pretrained works on a model whose parameters the fused engine
    re-laid out (strided views on CPU fp32), and what it saved loads back equal."""
    model = build_cqil_model(tiny_model("llama-gqa"), "1-2,3-4", 1)
    randomise_bypass(model)
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        logits = model(ids).logits
    assert not all(p.is_contiguous() for p in model.parameters())  # the case this covers
    model.save_pretrained(tmp_path / "m")
    again = CqilForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert rel(again(ids).logits, logits) < 1e-6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_freed_memory_hands_pages_back():
    """malloc_trim after freeing many mid-sized tensors (which glibc serves from its heap once
    its mmap threshold has risen) brings the resident size back down; elsewhere a no-op."""
    from cqil_cli.bench.memory import _rss_bytes
    from cqil_cli.core.devices import release_freed_memory

    warm = torch.empty(8 << 20, dtype=torch.uint8)  # an mmapped chunk, freed: the threshold rises
    del warm
    tensors = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(48)]  # 192 MB from the heap
    del tensors[:-1]  # the last one keeps the heap's top in use: only a trim returns the rest
    before = _rss_bytes()
    release_freed_memory()
    assert before - _rss_bytes() > 64 << 20


def test_a_bf16_folder_loaded_in_fp32_is_widened_tensor_by_tensor(tmp_path):
    """load_model of a bf16 folder with dtype float32 loads it in bf16 and casts each tensor
    (dropping its file pages): the same fp32 model as transformers' own fp32 load, exactly."""
    from tiny_models import offline_tokenizer
    from transformers import AutoModelForCausalLM

    from cqil_cli.inputs.models import load_model

    folder = tmp_path / "bf16"
    tiny_model("llama-gqa").to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    offline_tokenizer().save_pretrained(folder)
    ours = load_model(str(folder), dtype="float32").model
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # still tied
    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys()
    assert all(torch.equal(mine[k], other[k]) for k in mine)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
