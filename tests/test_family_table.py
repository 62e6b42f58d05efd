"""The table of families (cqil_cli/runtime/family_table_cqil.py): one row per base model_type,
the only place in the package that names a family, every row with a tiny model and every tiny
model with a row, and the one check of which engine runs what."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import FAMILIES, KINDS, LLAMA_FAMILY, OTHER_FAMILIES, tiny_config

from cqil_cli.runtime import family_table_cqil as table
from cqil_cli.runtime.checkpoint import RUNTIME_FILES
from cqil_cli.runtime.configuration_cqil import CqilConfig

PACKAGE = Path(__file__).resolve().parents[1] / "cqil_cli"
TABLE = PACKAGE / "runtime" / "family_table_cqil.py"


def test_every_row_has_a_tiny_model_and_every_tiny_model_a_row():
    rows = set(table.MODEL_TYPES)
    assert rows == set(table.FAMILIES) and len(table.MODEL_TYPES) == len(rows)
    assert all(row.examples for row in table.FAMILIES.values())
    assert set(KINDS) == set(table.EXAMPLES)  # tests/tiny_models.py's kinds are the table's
    assert {table.EXAMPLES[kind].model_type for kind in FAMILIES} == rows  # tiny_folder: all
    for kind in {*KINDS, *LLAMA_FAMILY, *OTHER_FAMILIES}:
        config = tiny_config(kind)  # the example builds the config of its row's family
        assert config.model_type == table.EXAMPLES[kind].model_type, kind
        assert type(config).__name__ == table.EXAMPLES[kind].config_class


def test_family_names_appear_only_in_the_table():
    """No .py of the package but the table holds a family's model_type as a string literal
    (error messages and decisions read the table)."""
    pattern = re.compile(r"""(["'])(%s)\1""" % "|".join(map(re.escape, table.MODEL_TYPES)))
    found = [f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if path != TABLE
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)


def test_table_imports_the_standard_library_only():
    for node in ast.walk(ast.parse(TABLE.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            assert not getattr(node, "level", 0), "the table imports no sibling"
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                assert name.split(".")[0] in {"__future__", *sys.stdlib_module_names}, name
    code = ("import sys, importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('t', {str(TABLE)!r})\n"
            "module = importlib.util.module_from_spec(spec); sys.modules['t'] = module\n"
            "spec.loader.exec_module(module)\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_converted_folders_carry_the_table():
    assert "family_table_cqil.py" in RUNTIME_FILES


def _old_fields(c) -> dict:
    """What configuration_cqil.from_base_config decided per family before the table (cqil 0.2),
    written out by family name: the rows must decide the same."""
    kind = c.model_type
    if kind in ("llama", "qwen3"):
        qkv_bias = out_bias = bool(getattr(c, "attention_bias", False))
        mlp_bias = bool(getattr(c, "mlp_bias", False)) if kind == "llama" else False
    elif kind in ("mistral", "phi3"):
        qkv_bias = out_bias = mlp_bias = False
    elif kind == "qwen2":
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        qkv_bias = out_bias = bool(getattr(c, "attention_bias", False))
        mlp_bias = False
    gemma = kind in ("gemma2", "gemma3_text")
    if kind == "granite":  # added with the table: Llama's layer, Granite's four multipliers
        qkv_bias = out_bias = bool(getattr(c, "attention_bias", False))
        mlp_bias = bool(getattr(c, "mlp_bias", False))
    granite = {name: getattr(c, name) if kind == "granite" else None for name in
               ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                "logits_scaling")}
    olmo2 = kind == "olmo2"  # added with the table: post-norms only, q/k norms over projections
    return dict(
        **granite, input_norms=not olmo2, norm_fp32_gain=olmo2, qk_norm_whole=olmo2,
        attention_bias=qkv_bias, attention_out_bias=out_bias, mlp_bias=mlp_bias,
        qk_norm=kind in ("qwen3", "gemma3_text", "olmo2"), norm_unit_offset=gemma,
        post_norms=gemma or olmo2,
        scale_embeddings=gemma,
        query_pre_attn_scalar=getattr(c, "query_pre_attn_scalar", None) if gemma else None,
        attn_logit_softcapping=getattr(c, "attn_logit_softcapping", None) if kind == "gemma2" else None,
        final_logit_softcapping=getattr(c, "final_logit_softcapping", None) if gemma else None,
        fused_projections=kind == "phi3")


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bias", [False, True])
def test_rows_decide_what_the_code_decided(kind, bias):
    overrides = dict(attention_bias=bias, mlp_bias=bias) if bias else {}
    base = tiny_config(kind, **overrides)
    cfg = CqilConfig.from_base_config(base, None)
    for name, value in _old_fields(base).items():
        assert getattr(cfg, name) == value, (kind, name)


def test_one_check_one_message():
    names = ", ".join(table.MODEL_TYPES)
    for engine in table.ENGINES:
        assert table.families_for(engine) == table.MODEL_TYPES  # every family, every engine
    row = table.require_engine({"model_type": "cqil", "base_model_type": "qwen2"}, "distributed",
                               "it")
    assert row.model_type == "qwen2" and table.runs_on(tiny_config("phi3-partial"), "fastgen")
    assert not table.runs_on("gpt2", "fused") and not table.runs_on(None, "reference")
    with pytest.raises(table.UnsupportedFamily) as plain:
        table.require_engine("gpt2", "fused", "'m'")
    assert str(plain.value) == (f"'m' is 'gpt2'; cqil's fused engine runs the families {names} "
                                "and folders converted from them")
    with pytest.raises(ValueError, match="'m' is converted from 'gpt2'; cqil's distributed"):
        table.require_engine({"model_type": "cqil", "base_model_type": "gpt2"}, "distributed",
                             "'m'")
    with pytest.raises(ValueError, match="'cqil'"):  # a string is a base model_type, as is
        table.family_of("cqil")
    with pytest.raises(ValueError, match="unknown engine"):
        table.families_for("warp")


def test_rows_refuse_what_the_runtime_does_not_implement():
    with pytest.raises(ValueError, match="norms 'stacked'"):
        table.Family("x", "X", "XConfig", "x", norms="stacked", examples={"x": {}})
    with pytest.raises(ValueError, match="examples"):
        table.Family("x", "X", "XConfig", "x")


def test_tiny_config_fits_the_layer_types_to_the_layer_count():
    _, settings = table.tiny_config("gemma3-local", num_hidden_layers=5)
    assert settings["layer_types"] == table.EXAMPLES["gemma3-local"].examples["gemma3-local"][
        "layer_types"][:5]
    _, settings = table.tiny_config("gemma3-local", num_hidden_layers=5, layer_types=None)
    assert settings["layer_types"] is None


def test_gguf_completions_are_the_tables():
    from cqil_cli.inputs.models import _GGUF_COMPLETIONS

    assert set(_GGUF_COMPLETIONS) == set(table.GGUF_COMPLETIONS)
