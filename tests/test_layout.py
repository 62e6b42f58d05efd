"""The package's layering (docs/development.md): a module imports only from its own layer and
the layers below it, and the runtime files copied next to converted weights import only torch,
transformers, the standard library and each other."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cqil_cli"
# Lowest first; layers on one rank (analyze, search, calibrate; convert, bench, generate) may
# not import each other.
RANKS = {"core": 0, "runtime": 1, "inputs": 2, "analyze": 3, "search": 3, "calibrate": 3,
         "convert": 4, "bench": 4,
         "generate": 4, "cli": 5, "benchmarks": 6}
# The files copied next to converted weights (checkpoint.RUNTIME_FILES), read from its source so
# that this test imports nothing of the package.
SELF_CONTAINED = next(ast.literal_eval(node.value) for node in ast.walk(ast.parse(
    (PACKAGE / "runtime" / "checkpoint.py").read_text())) if isinstance(node, ast.Assign)
    and any(getattr(t, "id", None) == "RUNTIME_FILES" for t in node.targets))
# (family_table_cqil.py imports the standard library only: tests/test_family_table.py)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what a file imports (relative imports resolved), every import anywhere."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "cqil_cli" and parts[1] in RANKS else None


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


def test_every_folder_is_a_layer():
    folders = {p.parent.name for p in modules()}
    assert folders <= set(RANKS), f"folders without a layer: {sorted(folders - set(RANKS))}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    own = path.relative_to(PACKAGE).parts[0]
    for module in imported_modules(path):
        other = layer_of(module)
        if other is None or other == own:
            continue
        assert RANKS[other] < RANKS[own], f"{path.name} ({own}) imports {module} ({other})"


@pytest.mark.parametrize("name", SELF_CONTAINED)
def test_runtime_files_are_self_contained(name):
    # safetensors comes with transformers (the distributed engine reads its slices from it)
    allowed = {"torch", "transformers", "safetensors", "__future__", *sys.stdlib_module_names}
    for module in imported_modules(PACKAGE / "runtime" / name):
        top = module.split(".")[0]
        if module.startswith("cqil_cli.runtime."):
            sibling = module.split(".")[2]
            assert f"{sibling}.py" in SELF_CONTAINED, f"{name} imports {module}"
        else:
            assert top in allowed, f"{name} imports {module}"


# The edges of a forward pass (runtime/edges_cqil.py) and the family code under them
# (runtime/families_cqil.py) are the only places that scale embeddings, cap logits or build RoPE.
EDGE_CODE = ("embedding_multiplier(", "softcap(", "make_rotary(", "RotaryEmbedding(",
             "build_attention_mask(")
EDGE_HOMES = ("edges_cqil.py", "families_cqil.py")


@pytest.mark.parametrize("path", [p for p in modules() if p.name not in EDGE_HOMES],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_forward_edges_are_written_once(path):
    text = path.read_text()
    found = [code for code in EDGE_CODE if code in text]
    assert not found, f"{path.name} computes an edge itself ({found}): use runtime/edges_cqil.py"
