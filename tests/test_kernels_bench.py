"""cqil_cli/benchmarks/kernels.py on tiny shapes: every variant timed, every kernel's output equal
to its own dequantized weights within tolerance, the table and the JSON document written
(torchao is optional: its rows appear only where it is importable)."""

from __future__ import annotations

import json

import torch

from cqil_cli.benchmarks import kernels

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "num_hidden_layers": 2, "vocab_size": 256}


def test_stack_shapes_follow_the_config():
    shapes = kernels.stack_shapes(kernels.DEFAULT_DIMS, 30)
    assert len(shapes) == 30 * 4 + 1
    assert shapes[:4] == [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]
    assert shapes[-1] == ("head", 49152, 576)


def test_tiny_run_checks_every_variant(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    result = kernels.main(["--layers", "1", "--repeats", "1", "--no-compile", "--json", str(out)], dims=TINY)
    doc = json.loads(out.read_text())
    assert doc["schema"] == "cqil.kernels/1" and doc["matmuls"] == 5 and doc["threads"] >= 1
    names = [r["variant"] for r in doc["rows"]]
    assert names[:4] == ["fp32", "bf16", "ours-int8", "ours-int4"]
    assert doc["torchao"] is not None or any("torchao" in n for n in doc["notes"])
    for row in doc["rows"]:
        assert row["ok"], row
        assert row["ms"] > 0 and row["weight_bytes"] > 0
    rows = {r["variant"]: r for r in result["rows"]}
    # our rows ran torch's kernels, not the reference fallback
    assert rows["ours-int8"]["kernel"] == "aten._weight_int8pack_mm"
    assert rows["ours-int4"]["kernel"] == "aten._weight_int4pack_mm_for_cpu"
    assert rows["ours-int8"]["weight_bytes"] < rows["bf16"]["weight_bytes"] < rows["fp32"]["weight_bytes"]
    assert rows["ours-int4"]["weight_bytes"] < rows["ours-int8"]["weight_bytes"]
    table = capsys.readouterr().out
    assert "cpu:" in table and "threads:" in table
    assert all(name in table for name in names)


def test_a_wrong_kernel_is_caught():
    v = kernels._dense("bf16", [torch.randn(16, 32)], torch.bfloat16)
    v.refs = [r * 1.1 for r in v.refs]  # a reference the kernel does not compute
    x = {32: torch.randn(1, 32)}
    assert kernels.check(v, x) > v.tol
