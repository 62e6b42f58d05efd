"""The converted folder: placement of the layers on ranks, the manifest, the model card, and the
one atomic write of it all (a temporary sibling folder renamed into place at the very end)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..core.files import staged_folder
from ..runtime.manifest import Manifest, write_manifest


def placement(model, strategy: str, devices: int, layer_names: list[int] | None = None) -> dict:
    """The manifest's `placement` (docs/convert.md): for cqil the distributed engine's layout on
    `devices` ranks (engine_placement); skip and prune run on one device: every layer, and every
    byte, on rank 0. layer_names: the manifest's numbers of model.model.layers (a pruned model's
    layers keep their original numbers)."""
    if strategy == "cqil":
        return engine_placement(model, devices)
    names = layer_names if layer_names is not None else list(range(len(model.model.layers)))
    stored = {t.data_ptr(): t for t in model.state_dict().values()}  # tied: counted once
    nbytes = sum(t.numel() * t.element_size() for t in stored.values())  # quantized codes too
    return {"ranks": [{"rank": 0, "layers": list(names), "bytes": nbytes}],
            "embedding_and_head": 0}


def engine_placement(model, world_size: int) -> dict:
    """What each of W ranks holds under the distributed engine (runtime/sharding_cqil.py):
    exactly plan_layout(config, W), with the bytes of each rank's shard (its layer slices, its
    rows of the vocab-parallel embedding and head, a tied head once, and the replicated final
    norm).

    ranks[r]: `rank`, `layers` (its layer of every step, in step order), `bytes`, and `slices`
    (per step: layer, lane of ranks, and the [start, stop) of its heads, kv heads and MLP
    columns). When the engine cannot run W ranks (plan_layout's ValueError) the folder is still a
    valid one-device conversion: `ranks` is null and `refused` says why.
    """
    from ..runtime.distributed_cqil import plan_layout, shard_nbytes

    config = model.config
    engine = "cqil_cli/runtime/distributed_cqil.py"  # the layout: runtime/sharding_cqil.py
    try:
        layout = plan_layout(config, world_size)
    except ValueError as refused:
        return {"engine": engine, "world_size": world_size, "ranks": None, "refused": str(refused)}
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}  # checkpoint names
    replicated = [model.model.norm]  # on every rank; embedding and head: vocab rows per rank
    ranks = []
    for r in range(world_size):
        slices = layout.slices(r)
        ranks.append({
            "rank": r, "layers": [sl.layer for sl in slices],
            "bytes": shard_nbytes(config, layout, r, dtypes),
            "slices": [{"step": sl.step, "layer": sl.layer, "lane": list(sl.lane),
                        "heads": [sl.heads.start, sl.heads.stop],
                        "kv_heads": [sl.kv_heads.start, sl.kv_heads.stop],
                        "columns": [sl.columns.start, sl.columns.stop]} for sl in slices]})
    return {"engine": engine, "world_size": world_size, "vocab_parallel": layout.vocab_parallel,
            "replicated_bytes": sum(p.numel() * p.element_size()
                                    for m in replicated for p in m.parameters()),
            "ranks": ranks}


def fingerprint(ids: torch.Tensor) -> str:
    """A short digest of token windows: which calibration data a conversion saw."""
    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]


def write_output(model, tokenizer, out: Path, manifest: Manifest, plain: bool) -> Manifest:
    """Write the folder atomically; returns the manifest with the digests of its files.

    plain=False writes a cqil checkpoint (config with auto_map, the runtime files); plain=True
    a base-architecture folder any tool loads. Both get the model card and the manifest.
    """
    from ..runtime.checkpoint import write_converted

    with staged_folder(Path(out), replace=True) as folder:
        if plain:
            model.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
        else:
            write_converted(model, tokenizer, folder)
        (folder / "README.md").write_text(model_card(manifest))
        return write_manifest(folder, manifest)


def model_card(m: Manifest) -> str:
    q, p = m.quality, m.predicted
    grouped = [f"{g[0]}-{g[-1]}" for g in m.steps if len(g) > 1]
    if m.strategy == "skip":
        method = (f"each generated token through {m.num_steps} of the {m.num_layers} layers "
                  f"(Unified Layer Skipping, Liu et al., 2024; the prompt runs through all of them). "
                  f"Skipped when decoding: {', '.join(map(str, m.skipped_layers))}.")
    elif m.strategy == "prune":
        method = (f"{m.num_steps} of the {m.num_layers} layers kept (ShortGPT-style removal "
                  f"of the lowest block influence): removed {', '.join(map(str, m.removed_layers))}. "
                  "A plain model: no custom code needed.")
    else:
        method = (f"{m.num_layers} layers run in {m.num_steps} sequential steps. Groups of "
                  "adjacent layers share their input and run concurrently (CQIL, Zou et al., ACL "
                  f"2024): {', '.join(grouped) or 'none'}; bypass distance {m.bypass_distance}.")
    kind = {"cqil": "concurrent-layers", "skip": "layer-skipping", "prune": "layer-pruning"}
    tags = ", ".join(["cqil", kind.get(m.strategy, m.strategy), "depth-reduction"])
    return f"""---
library_name: transformers
tags: [{tags}]
base_model: {m.base_model['name']}
---
# {m.base_model['name']} — cqil ({m.strategy})

Converted by cqil {m.cqil_version} from `{m.base_model['spec']}`: {method}

| | value |
| --- | --- |
| predicted decode latency (cqil engine, one device) | {p['latency_ratio']:.3f} × the original |
| held-out perplexity, original | {q['ppl_original']:.3f} |
| held-out perplexity, converted before tuning | {q['ppl_untuned']:.3f} |
| held-out perplexity, converted after tuning | {q['ppl_tuned']:.3f} |

Held-out text: `{q['eval']}` ({q['eval_tokens']:,} tokens; scored: the tokens after the first
{q['prompt_tokens']} of each window, which serve as the prompt). Tuning: {m.tuning.get('steps', 0)}
steps of distillation ({m.tuning.get('seconds', 0)} s).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH")
```
`import cqil_cli` first and `trust_remote_code` is not needed. `manifest.json` records the
grouping, the device placement, the measurements and the sha256 of every file (cqil refuses a
changed file).
"""
