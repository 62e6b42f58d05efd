"""The converted folder: placement of the layers on ranks, the manifest, the model card, and the
one atomic write of it all (a temporary sibling folder renamed into place at the very end)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..core.files import staged_folder
from ..runtime.manifest import Manifest, write_manifest


def placement(model, steps: list[list[int]], devices: int,
              layer_names: list[int] | None = None) -> dict:
    """Which rank holds which layers for P devices, with bytes per rank.

    steps index model.model.layers; layer_names maps those indices to the layer numbers the
    manifest records (a pruned model's layers keep their original numbers). Member j of each
    group goes to rank j, so a group's layers run at the same time; a single layer goes to the
    least-loaded rank (it runs alone either way). Embedding, final norm and head: rank 0.
    """
    def nbytes(module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    names = layer_names if layer_names is not None else list(range(len(model.model.layers)))
    layers = model.model.layers
    ranks = [{"rank": r, "layers": [], "bytes": 0} for r in range(devices)]
    ranks[0]["bytes"] += nbytes(model.model.embed_tokens) + nbytes(model.model.norm)
    if not model.config.tie_word_embeddings:
        ranks[0]["bytes"] += nbytes(model.lm_head)
    for step in steps:
        for j, layer in enumerate(step):
            target = min(ranks, key=lambda r: r["bytes"]) if len(step) == 1 else ranks[j % devices]
            target["layers"].append(names[layer])
            target["bytes"] += nbytes(layers[layer])
    return {"ranks": ranks, "embedding_and_head": 0}


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
