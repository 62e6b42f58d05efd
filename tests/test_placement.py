"""The manifest's `placement` (cqil_cli/convert/export.py, docs/convert.md): for the cqil strategy
exactly the distributed engine's layout (plan_layout) with each rank's shard bytes, for every
family (Llama's, Gemma 2, Gemma 3, Phi-3); refused world sizes recorded, not raised; skip and
prune on one rank."""

from __future__ import annotations

import pytest
import torch
from tiny_models import randomise_bypass, tiny_model

from cqil_cli.convert.export import engine_placement, placement
from cqil_cli.runtime.checkpoint import build_cqil_model
from cqil_cli.runtime.distributed_cqil import plan_layout, shard_from_model
from cqil_cli.runtime.manifest import Manifest, read_manifest, write_manifest


def converted(kind: str, groups, bypass: int = 1, **overrides):
    model = build_cqil_model(tiny_model(kind, **overrides), groups, bypass)
    randomise_bypass(model, seed=2)
    return model


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once


def shard_bytes(shard) -> int:
    """Bytes of the tensors a built shard holds (a tied head is the embedding: counted once)."""
    unique = {t.data_ptr(): t for t in shard.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


KV4 = {"num_key_value_heads": 4}


@pytest.mark.parametrize("kind, groups, world, overrides", [
    ("llama-gqa", "0-1,2-3", 2, {}),  # tied head; groups on lanes of one, layer 4 split
    ("llama-bias", "0-1,2-3", 4, {}),  # untied, biases; lanes of 2, layer 4 over 4 ranks
    ("llama-bias", "0-3", 4, {}),  # a group of 4: each member whole on one rank
    ("qwen2-bias", "none", 2, {}),  # the original, tensor-parallel
    ("gemma2-softcap", "0-1,2-3", 2, {}),  # four norms per layer, tied head
    ("gemma3-local", "1-2,3-4,5-6", 4, KV4),  # q/k norms, untied head; lanes of 2
    ("phi3-partial", "1-2,3-4", 2, {}),  # fused qkv_proj and gate_up_proj rows per rank
])
def test_placement_is_the_engine_layout_with_shard_bytes(kind, groups, world, overrides):
    model = converted(kind, groups, **overrides)
    layout = plan_layout(model.config, world)
    got = placement(model, "cqil", world)
    assert got["world_size"] == world and len(got["ranks"]) == world
    replicated = got["replicated_bytes"]
    for r, rank in enumerate(got["ranks"]):
        assert rank["rank"] == r
        assert rank["layers"] == [layout.slice(r, s).layer for s in range(len(layout.groups))]
        shard = shard_from_model(model, layout, r)
        assert rank["bytes"] == shard_bytes(shard)
        assert replicated < rank["bytes"] < model_bytes(model)
        for entry, sl in zip(rank["slices"], layout.slices(r), strict=True):
            assert entry["lane"] == list(sl.lane)
            assert range(*entry["heads"]) == sl.heads and range(*entry["columns"]) == sl.columns
            assert range(*entry["kv_heads"]) == sl.kv_heads
    assert replicated == model.model.norm.weight.nbytes  # embedding and head: vocab rows
    assert sum(len(layout.vocab_rows(r)) for r in range(world)) == model.config.vocab_size


def test_every_layer_is_held_and_a_group_of_w_splits_nothing():
    model = converted("llama-bias", "0-3")  # layer 4 single
    got = engine_placement(model, 4)
    assert [rank["layers"] for rank in got["ranks"]] == [[0, 4], [1, 4], [2, 4], [3, 4]]
    layer = model.model.layers[1]
    layer_bytes = sum(p.nbytes for p in layer.parameters())
    assert all(entry["lane"] == [1] for entry in got["ranks"][1]["slices"][:1])
    # rank 1 holds layer 1 whole, a quarter of layer 4 (o_proj/down_proj biases on rank 0 only)
    assert got["vocab_parallel"] and got["ranks"][1]["bytes"] > layer_bytes + got["replicated_bytes"]


@pytest.mark.parametrize("kind, groups, world, reason", [
    ("mistral-one-kv", "none", 2, "1 kv heads"),  # one kv head cannot split over 2 ranks
    ("llama-gqa", "1-2", 4, "2 kv heads"),  # single layers over 4 ranks, 2 kv heads
    ("llama-gqa", "0-2", 2, "has 3 layers"),  # a group of 3 on 2 ranks
    ("gemma3-local", "1-2", 2, "1 kv heads"),  # its single layers cannot split over 2 ranks
])
def test_a_world_size_the_engine_refuses_is_recorded_not_raised(kind, groups, world, reason):
    got = placement(converted(kind, groups), "cqil", world)
    assert got["ranks"] is None and got["world_size"] == world
    assert reason in got["refused"] and "this grouping" in got["refused"]


def test_skip_and_prune_keep_one_rank():
    model = converted("llama-gqa", "none")  # every layer single; skip places them all on rank 0
    got = placement(model, "skip", 1, list(range(5)))
    assert got["ranks"] == [{"rank": 0, "layers": [0, 1, 2, 3, 4], "bytes": model_bytes(model)}]
    hf = tiny_model("llama-bias")
    del hf.model.layers[3]  # a pruned model's layers keep their original numbers
    got = placement(hf, "prune", 1, [0, 1, 2, 4])
    assert got["ranks"] == [{"rank": 0, "layers": [0, 1, 2, 4], "bytes": model_bytes(hf)}]


def manifest_with(place: dict) -> Manifest:
    return Manifest(cqil_version="0", strategy="cqil", base_model={}, steps=[[0]], num_steps=1,
                    num_layers=1, bypass_distance=0, devices=2, placement=place, predicted={},
                    quality={}, calibration={}, tuning={}, grouping={})


@pytest.mark.parametrize("place", [
    {"ranks": [{"rank": 0, "layers": [0], "bytes": 10}], "embedding_and_head": 0},  # cqil 0.1
    {"engine": "cqil_cli/runtime/distributed_cqil.py", "world_size": 2, "ranks": None,
     "refused": "cannot run this model on 2 ranks: ..."},
])
def test_old_and_refused_placements_round_trip(tmp_path, place):
    write_manifest(tmp_path, manifest_with(place))
    assert read_manifest(tmp_path).placement == place


def test_placement_bytes_follow_the_dtype():
    model = converted("llama-gqa", "0-1,2-3").to(torch.bfloat16)
    fp32 = placement(converted("llama-gqa", "0-1,2-3"), "cqil", 2)
    bf16 = placement(model, "cqil", 2)
    assert [r["bytes"] * 2 for r in bf16["ranks"]] == [r["bytes"] for r in fp32["ranks"]]


def test_convert_for_a_refused_world_size_still_writes_its_folder(llama_folder, tmp_path):
    """`cqil convert --group-size 4` of a 2-kv-head model: single layers cannot split over 4 ranks,
    yet the conversion (a valid one-device folder) is written, its placement saying why."""
    import random

    from cqil_cli.convert import pipeline as conv

    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box".split()
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(4000)))
    opts = conv.ConvertOptions(out=tmp_path / "out", groups="1-2", group_size=4, tune_steps=0,
                               tune_minutes=None, calib=str(text), eval=str(text),
                               eval_ood=None, window_len=64, eval_windows=4)
    conv.run_convert(str(llama_folder), opts, {"device": "cpu"}, conv.Callbacks())
    manifest = read_manifest(tmp_path / "out")
    assert manifest.devices == 4 and manifest.placement["ranks"] is None
    assert "cannot run this model on 4 ranks" in manifest.placement["refused"]
