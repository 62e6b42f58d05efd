"""A model spec on W ranks of cqil's distributed engine: what one rank loads (docs/generate.md,
"What each rank reads"), shared by `cqil generate --ranks` and `cqil bench --ranks`.

  load_rank_part(spec, rank, W, ...)   this rank's shard: from a local safetensors folder only its
                                       slices (safetensors_reader + load_shard), else the whole
                                       model loaded and sliced
  check_world_size(spec, W)            plan_layout's verdict from config.json alone, before any
                                       process starts
  gather_ints(value, W, device)        every rank's integer, in rank order (a collective)
  stop_ids / eos_ids                   the end-of-sequence ids of a model or its config files
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import CqilError


def stop_ids(model) -> list[int]:
    """The end-of-sequence ids of the model's generation config (or config), maybe none."""
    return eos_ids(getattr(model, "generation_config", None), model.config)


def eos_ids(generation_config, config) -> list[int]:
    """The eos_token_id of the generation config (None: absent), else of the model config, as
    a list (maybe empty)."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in ([eos] if isinstance(eos, int) else eos)]


def require_rank_model(model, spec: str) -> None:
    """Only what cqil's distributed engine runs can be spread over ranks: a model of a family
    whose row names it (runtime/family_table_cqil.py), or a folder converted from one. model:
    a config, a config.json dict or a LoadedModel."""
    from .models import require_engine

    require_engine(model, "distributed", f"--ranks: '{spec}'")


def check_world_size(spec: str, world_size: int, trust_remote_code: bool = False) -> str | None:
    """A one-line CqilError when W ranks cannot run this model (plan_layout's verdict), from the
    folder's config files alone, before any process starts; a model that is not a local folder
    (a .gguf file, a hub id) is checked by the ranks themselves.

    Returns a note to show once when a converted folder's manifest placed it on another number
    of ranks (the ranks then recompute its placement for W), else None."""
    from ..runtime.manifest import read_manifest
    from .models import local_model_folder, read_config

    if world_size < 1:
        raise CqilError(f"--ranks must be at least 1, got {world_size}")
    folder = local_model_folder(spec)
    if folder is None:
        return None
    raw = read_config(folder)
    kind = raw.get("model_type")
    require_rank_model(raw, spec)
    config, _ = _folder_config_and_stops(folder, kind, trust_remote_code)
    plan_for(config, world_size, spec)
    manifest = read_manifest(folder) if kind == "cqil" else None
    placed = (manifest.placement or {}).get("world_size") if manifest else None
    if placed is not None and placed != world_size:
        return (f"{spec} was placed on {placed} ranks (manifest.json); its placement on "
                f"{world_size} ranks is recomputed (runtime/sharding_cqil.py: plan_layout)")
    return None


@dataclass
class RankPart:
    """What one rank loaded before joining the process group."""

    shard: object  # its CqilShard, on the CPU
    tokenizer: object
    name: str  # the model's readable name
    stops: list[int]  # end-of-sequence ids
    bytes_read: int  # weight bytes this rank read (its slices, or the whole model on fallback)
    model_bytes: int  # the whole model's weight bytes (a tied head once), for comparison


def load_rank_part(spec: str, rank: int, world_size: int, dtype: str = "float32",
                   trust_remote_code: bool = False, allow_pickle: bool = False,
                   vocab_parallel: bool = True) -> RankPart:
    """Rank `rank`'s shard of spec for world_size ranks.

    A local folder (or `default`) with safetensors weights: only this rank's slices are read
    (safetensors_reader + load_shard), after load_model's checks (config.json, no pickled-only
    weights, a cqil-written folder's manifest). Any other spec (a .gguf file, a hub id,
    pickled weights allowed): the whole model is loaded and sliced (shard_from_model).
    """
    from ..runtime.distributed_cqil import load_shard, safetensors_reader
    from .models import (
        check_model_folder,
        folder_model_name,
        load_tokenizer,
        local_model_folder,
        torch_dtype,
    )

    folder = local_model_folder(spec)
    if folder is None or not any(folder.glob("*.safetensors")):
        return _load_rank_part_whole(spec, rank, world_size, dtype, trust_remote_code,
                                     allow_pickle, vocab_parallel)
    raw = check_model_folder(folder, allow_pickle)
    kind = raw.get("model_type")
    require_rank_model(raw, spec)
    config, stops = _folder_config_and_stops(folder, kind, trust_remote_code)
    layout = plan_for(config, world_size, spec, vocab_parallel)
    read = safetensors_reader(folder)
    counted = [0]

    def read_counted(sl):  # the slice's own bytes: what this rank reads from the files
        t = read(sl)
        counted[0] += t.numel() * t.element_size()
        return t

    try:
        shard = load_shard(config, layout, rank, read_counted, "cpu", torch_dtype(dtype))
    except ValueError as exc:  # a tensor missing from the files, or of the wrong shape
        raise CqilError(f"{folder}: cannot read this rank's weights ({exc})") from exc
    return RankPart(shard, load_tokenizer(folder, trust_remote_code),
                    folder_model_name(spec, folder, raw), stops, counted[0],
                    safetensors_weight_bytes(folder))


def safetensors_weight_bytes(folder: Path) -> int:
    """Bytes of every tensor in the folder's *.safetensors files, from their headers only
    (a tied head is stored once)."""
    import json
    import struct

    total = 0
    for path in Path(folder).glob("*.safetensors"):
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        total += sum(end - start for name, entry in header.items() if name != "__metadata__"
                     for start, end in [entry["data_offsets"]])
    return total


def _folder_config_and_stops(folder: Path, kind: str, trust_remote_code: bool):
    """(CqilConfig, stop ids) from the folder's config files, without its weights. A plain
    folder of a family the distributed engine runs (require_rank_model) becomes every layer
    its own step; its tensor names are the ones a converted checkpoint uses, so the same reader
    serves both."""
    from transformers import AutoConfig, GenerationConfig

    from ..runtime.configuration_cqil import CqilConfig

    try:
        if kind == "cqil":
            config = CqilConfig.from_pretrained(folder)
        else:
            config = CqilConfig.from_base_config(
                AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code), None)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise CqilError(f"{folder}: cannot read its config ({line})") from exc
    generation = None
    if (folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(folder)
    return config, eos_ids(generation, config)


def _load_rank_part_whole(spec: str, rank: int, world_size: int, dtype: str,
                          trust_remote_code: bool, allow_pickle: bool,
                          vocab_parallel: bool) -> RankPart:
    from ..runtime.checkpoint import build_cqil_model
    from ..runtime.distributed_cqil import shard_from_model
    from .models import load_model

    loaded = load_model(spec, device="cpu", dtype=dtype,
                        trust_remote_code=trust_remote_code,
                        allow_pickle=allow_pickle)
    require_rank_model(loaded, spec)
    model, stops = loaded.model, stop_ids(loaded.model)
    whole_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
    if loaded.model_type != "cqil":
        model = build_cqil_model(model, None, 0)  # every layer its own step
    layout = plan_for(model.config, world_size, spec, vocab_parallel)
    return RankPart(shard_from_model(model, layout, rank, "cpu"), loaded.tokenizer, loaded.name,
                    stops, whole_bytes, whole_bytes)


def plan_for(config, world_size: int, spec: str, vocab_parallel: bool = True):
    from ..runtime.distributed_cqil import plan_layout

    try:
        return plan_layout(config, world_size, vocab_parallel)
    except ValueError as exc:
        raise CqilError(f"{spec}: {exc}") from exc


def gather_ints(value: int, world_size: int, device: torch.device) -> list[int]:
    """Every rank's value, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist

    mine = torch.tensor([value], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]
