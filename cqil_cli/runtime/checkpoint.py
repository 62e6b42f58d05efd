"""Build, save and load CQIL-converted checkpoints (docs/runtime.md).

- `parse_groups(spec, num_layers)`      "14-15,16-17" / "none" -> the ordered steps
- `build_cqil_model(model, groups, D)`    a loaded transformers causal LM of a family of
                                        family_table_cqil.py -> CqilForCausalLM
- `save_converted(model, tok, out_dir)` an atomic Hugging Face folder (config with auto_map,
                                        safetensors with the base names, tokenizer, modeling file)
- `load_converted(path)`                load such a folder back (cqil's classes, no remote code)
- `register_auto_classes()`             make AutoConfig/AutoModelForCausalLM know model_type "cqil"
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..core.files import staged_folder
from ..core.groups import parse_group_spec
from .configuration_cqil import FULL, SLIDING, CqilConfig, check_groups
from .edges_cqil import make_rotaries
from .family_table_cqil import require_engine
from .fused_cqil import file_mappings, release_file_pages
from .modeling_cqil import CqilForCausalLM, contiguous_state_dict
from .quant_cqil import check_quantized

RUNTIME_DIR = Path(__file__).parent
# The self-contained files a converted folder carries (torch + transformers only), so that
# trust_remote_code=True works where cqil is not installed.
RUNTIME_FILES = ("family_table_cqil.py", "configuration_cqil.py", "modeling_cqil.py", "families_cqil.py",
                 "edges_cqil.py", "fused_cqil.py", "sharding_cqil.py", "distributed_cqil.py", "quant_cqil.py")
AUTO_MAP = {
    "AutoConfig": "configuration_cqil.CqilConfig",
    "AutoModelForCausalLM": "modeling_cqil.CqilForCausalLM",
}


def register_auto_classes() -> None:
    """Register model_type "cqil" with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("cqil", CqilConfig, exist_ok=True)
    AutoModelForCausalLM.register(CqilConfig, CqilForCausalLM, exist_ok=True)


def parse_groups(spec: str, num_layers: int) -> list[list[int]]:
    """Parse a manual grouping into the ordered list of steps (core/groups.py; a ValueError
    for a bad spec)."""
    return check_groups(parse_group_spec(spec, num_layers), num_layers)


SHARABLE = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")  # outside layers


def build_cqil_model(base_model, groups: list[list[int]] | str | None, bypass_distance: int = 0,
                     skip_layers: list[int] | None = None, share_outside_layers: bool = False,
                     consume: bool = False, packed: bool = False) -> CqilForCausalLM:
    """Build a CqilForCausalLM from a loaded transformers causal LM of a family of
    family_table_cqil.py (tensor names as the base's, Phi-3's fused qkv_proj / gate_up_proj
    included).

    Every base tensor is copied (names and shapes checked); the new bypass weights (gamma, beta)
    start at 1. skip_layers: layers only the prompt runs through (Unified Layer Skipping).
    The result has the base model's dtype and device and is in eval mode.

    Memory, for callers that hold the base model too: share_outside_layers makes the embedding,
    the head and the final norm the base's own parameters instead of copies (a short-lived
    model beside its base: a 1B model's tied embedding is a fifth of its weights); consume
    frees each base tensor once copied, so that base and result are never both whole (the base
    model is unusable afterwards); packed allocates the layers in the fused engine's layout
    (CqilModel.pack_weights) and fills that, so its first fused use copies nothing, where
    otherwise that use re-lays every layer out (briefly two copies). Not the default: the
    reference engine's fp32 rounding differs slightly on re-laid-out (strided) weights, and
    the distributed engine is checked against it op for op.
    """
    config = getattr(base_model, "config", None)
    name = type(base_model).__name__
    require_engine(getattr(config, "model_type", None), "reference", f"cannot convert {name}: it")
    if not name.endswith("ForCausalLM"):
        raise ValueError(f"cannot convert {name}: cqil converts causal LMs (a *ForCausalLM class)")
    if isinstance(groups, str):
        groups = parse_groups(groups, config.num_hidden_layers)
    cfg = CqilConfig.from_base_config(config, groups, bypass_distance, skip_layers=skip_layers)
    param = next(base_model.parameters())
    dtype, device = param.dtype, param.device
    cfg.dtype = dtype

    # Build on the meta device (no random init), then fill every tensor explicitly.
    with torch.device("meta"):
        model = CqilForCausalLM(cfg)
    model.to(dtype)  # still on meta: free, and the allocation below is already in `dtype`
    model.to_empty(device=device)
    if packed:
        model.model.pack_weights()  # the stored layout is the fused engine's: filled in place
    source = base_model.state_dict()
    target = model.state_dict()
    new_keys = {k for k in target if k.rsplit(".", 1)[-1] in ("cqil_gamma", "cqil_beta")}
    expected = set(target) - new_keys
    if cfg.tie_word_embeddings:
        source = {k: v for k, v in source.items() if k != "lm_head.weight"}
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(source))
    unexpected = sorted(set(source) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{type(base_model).__name__} tensors do not match the cqil layout: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    shared = {n for n in SHARABLE if n in expected} if share_outside_layers else set()
    base_params = dict(base_model.named_parameters(remove_duplicate=False)) if consume else {}
    mappings = file_mappings() if consume else []
    with torch.no_grad():
        for name in sorted(expected):
            src, dst = source.pop(name), target[name]  # popped: consume frees it below
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{name}: shape {tuple(src.shape)} in the base model, cqil expects {tuple(dst.shape)}")
            if name in shared:
                continue
            dst.copy_(src)
            del src
            if name in base_params:  # consume: the base's tensor, and its file pages, go now
                param = base_params[name]
                old, param.data = param.data, torch.empty(0, dtype=dst.dtype, device=dst.device)
                release_file_pages(old, mappings)
                del old
        for name in shared:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr,
                    base_model.get_submodule(module_name).get_parameter(attr))
        for name in new_keys:
            target[name].fill_(1.0)
        # Non-persistent buffers (RoPE inverse frequencies) are computed, not loaded.
        fresh = make_rotaries(cfg, device)  # layer type -> RoPE module
        for rope, kind in ((model.model.rotary_emb, FULL), (model.model.rotary_local, SLIDING)):
            if rope is not None:
                rope.inv_freq = fresh[kind].inv_freq
                rope.original_inv_freq = fresh[kind].original_inv_freq
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if getattr(base_model, "generation_config", None) is not None:
        model.generation_config = base_model.generation_config.__class__.from_dict(base_model.generation_config.to_dict())
    model.config.name_or_path = getattr(config, "name_or_path", "") or ""
    return model.eval()


def write_converted(model: CqilForCausalLM, tokenizer, folder: Path) -> None:
    """Write a converted checkpoint's files into an existing folder (no staging: callers
    stage, see save_converted and convert's export).

    Files: config.json (model_type cqil, auto_map), model.safetensors (base names + cqil_gamma /
    cqil_beta; a tied lm_head is stored once), generation_config.json, tokenizer files, and the
    runtime files the config's auto_map names (RUNTIME_FILES).
    """
    if not isinstance(model, CqilForCausalLM) and type(model).__name__ != "CqilForCausalLM":
        raise TypeError(f"expected a CqilForCausalLM, got {type(model).__name__}")
    folder = Path(folder)
    model.config.auto_map = dict(AUTO_MAP)
    model.config.architectures = ["CqilForCausalLM"]
    model.save_pretrained(folder, safe_serialization=True)  # contiguous copies: its own
    for name in RUNTIME_FILES:
        shutil.copyfile(RUNTIME_DIR / name, folder / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_converted(model: CqilForCausalLM, tokenizer, out_dir, overwrite: bool = False) -> Path:
    """Write a converted checkpoint folder atomically (see write_converted) and return its path.

    Everything is written to a temporary sibling folder first and renamed into place, so a crash
    never leaves half a checkpoint at `out_dir`. An existing `out_dir` is replaced only with
    `overwrite=True`.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    with staged_folder(out, replace=overwrite) as folder:
        write_converted(model, tokenizer, folder)
    return out


def load_converted(path, dtype: torch.dtype | str | None = None, device: str = "cpu",
                   engine: str | None = None) -> CqilForCausalLM:
    """Load a converted folder with cqil's own classes (no remote code executed)."""
    from transformers import AutoModelForCausalLM

    register_auto_classes()
    if isinstance(dtype, str):
        dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, trust_remote_code=False)
    if not isinstance(model, CqilForCausalLM):
        raise ValueError(f"{path} is not a cqil-converted checkpoint (loaded {type(model).__name__})")
    check_quantized(model, str(path))
    if engine is not None:
        model.set_engine(engine)
    return model.to(device).eval()


__all__ = ["parse_groups", "build_cqil_model", "contiguous_state_dict", "write_converted", "save_converted", "load_converted", "register_auto_classes"]


register_auto_classes()  # import cqil_cli defers it until transformers loads (__init__.py)
