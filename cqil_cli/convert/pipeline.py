"""`cqil convert`: choose a grouping, tune the bypass briefly, write checkpoint + manifest.

Plain functions; the click command in cli.py only gathers options and shows progress.
Pipeline (docs/method.md):
  1. the grouping: by hand (--groups, or the papers' --start/--end/--parallel), or searched
     under a latency budget on analyze's sensitivity and a latency model measured here;
  2. held-out perplexity of the original, then of the untuned grouped model;
  3. brief distillation (bypass weights, LoRA merged), kept only if held-out perplexity improves;
  4. an atomic write: a temporary sibling folder renamed into place at the very end.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..core.errors import CqilError
from ..core.files import safetensors_digests, staged_folder

DEFAULT_BUDGET = 0.9
STRATEGIES = ("cqil", "skip", "prune")


@dataclass
class ConvertOptions:
    out: Path
    strategy: str = "cqil"
    devices: int = 2  # P: the largest group; ranks of the placement
    budget: float | None = None
    speedup: float | None = None
    steps: int | None = None
    groups: str | None = None
    start: int | None = None
    end: int | None = None
    parallel: int | None = None
    bypass: int = 1
    tune_steps: int | None = None
    tune_minutes: float | None = 3.0
    lora_rank: int = 16
    calib: str = "default"
    eval: str = "default:heldout"
    eval_ood: str | None = "default:ood"  # out-of-domain text, reported beside --eval
    report: Path | None = None
    seed: int = 0
    force: bool = False
    calib_samples: int = 8  # sensitivity samples when no --report is given
    tune_samples: int = 256  # calibration windows for tuning (seq_len tokens each)
    seq_len: int = 256
    eval_samples: int = 16
    eval_prompt: int | None = None  # tokens of each eval window that are prompt, not scored (None: half)
    candidates: int = 4  # best partitions re-measured whole


    @property
    def prompt_tokens(self) -> int:
        return self.seq_len // 2 if self.eval_prompt is None else self.eval_prompt


@dataclass
class Callbacks:
    status: Callable[[str], None] = lambda text: None
    progress: Callable[[str, int], Callable[[], None]] = lambda label, total: (lambda: None)
    tune_step: Callable[[int, float, float], None] | None = None
    tune_start: Callable[[int | None, float | None], None] = lambda steps, minutes: None


def check_output_dir(out: Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CqilError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CqilError(f"--out {out} is not empty; pass --force to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CqilError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CqilError(f"cannot write {out}: permission denied")


def budget_fraction(opts: ConvertOptions) -> float | None:
    chosen = [x for x in (opts.budget, opts.speedup, opts.steps, opts.groups, opts.start)
              if x is not None]
    if len(chosen) > 1:
        raise CqilError("give one of --budget, --speedup, --steps, --groups, or "
                        "--start/--end/--parallel")
    if opts.budget is not None:
        if not 0 < opts.budget <= 1:
            raise CqilError(f"bad --budget {opts.budget}: a fraction in (0, 1]")
        return opts.budget
    if opts.speedup is not None:
        if opts.speedup < 1:
            raise CqilError(f"bad --speedup {opts.speedup}: at least 1")
        return 1.0 / opts.speedup
    if not chosen:
        return DEFAULT_BUDGET
    return None


# ---------------------------------------------------------------- choosing the grouping


def load_report(path: Path, num_layers: int, devices: int) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CqilError(f"--report {path}: unreadable ({exc})") from exc
    if not str(report.get("schema", "")).startswith("cqil.analyze/"):
        raise CqilError(f"--report {path}: not a `cqil analyze --json` report")
    if report.get("num_layers") != num_layers:
        raise CqilError(f"--report {path} describes {report.get('num_layers')} layers; the "
                        f"model has {num_layers}")
    if report.get("window", 0) < devices or not report.get("groups"):
        raise CqilError(f"--report {path} has sensitivity for groups up to "
                        f"{report.get('window')} layers; --devices {devices} needs "
                        f"`cqil analyze --window {devices}`")
    return report


@torch.no_grad()
def grouping_kl(base_model, groups, bypass: int, ids: torch.Tensor, teacher_logp=None,
                batch_size: int = 4) -> float:
    """Mean per-token KL(original ‖ grouped, untuned) on ids [n, L]."""
    from ..runtime.checkpoint import build_cqil_model

    model = build_cqil_model(base_model, groups, bypass)
    device = next(base_model.parameters()).device
    total, count = 0.0, 0
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        log_p = torch.log_softmax(base_model(input_ids=batch, use_cache=False).logits.float(), -1)
        log_q = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
        total += (log_p.exp() * (log_p - log_q)).sum().item()
        count += batch.numel()
    del model
    return total / count


def search_grouping(loaded, opts: ConvertOptions, fraction: float | None, latency, cb: Callbacks):
    """Returns (groups, details dict) for the cqil strategy."""
    from ..calibrate.profile import AnalyzeOptions, analyze_model, progress_steps
    from ..calibrate.search import best_partitions
    from ..inputs.text import token_samples_up_to

    n = loaded.num_layers
    if opts.report is not None:
        report = load_report(opts.report, n, opts.devices)
        cb.status(f"sensitivity from {opts.report}")
    else:
        options = AnalyzeOptions(window=max(2, opts.devices), latency=False)
        ids = token_samples_up_to(loaded.tokenizer, opts.calib, opts.calib_samples, 128,
                                  opts.seed)
        tick = cb.progress("sensitivity", progress_steps(len(ids), options, n))
        report = analyze_model(loaded, ids, options, lambda _label: tick())
    cost = {tuple(g["layers"]): float(g["kl"]) for g in report["groups"]
            if g["size"] <= opts.devices}
    if opts.steps is not None:
        if not 1 <= opts.steps <= n:
            raise CqilError(f"bad --steps {opts.steps}: between 1 and {n}")
        step_latency = {s: 1.0 for s in range(1, opts.devices + 1)}
        allowance = float(opts.steps)
    else:
        step_latency = {s: latency.step_ms[s] for s in range(1, opts.devices + 1)
                        if s in latency.step_ms}
        allowance = fraction * latency.original_ms - latency.outside_ms
        if allowance <= 0:
            raise CqilError(f"the budget {fraction:.3f} is below the time outside the layers "
                            f"({latency.outside_ms / latency.original_ms:.3f} of the original)")
    try:
        candidates = best_partitions(n, opts.devices, step_latency, cost, allowance,
                                     keep=opts.candidates)
    except CqilError as exc:
        if opts.steps is not None:
            raise CqilError(f"--steps {opts.steps} cannot be met with groups of at most "
                            f"{opts.devices} layers: the fewest is "
                            f"{-(-n // opts.devices)}") from exc
        fastest = latency.outside_ms + min_layers_ms(n, opts.devices, latency)
        raise CqilError(f"the budget {fraction:.3f} cannot be met with groups of at most "
                        f"{opts.devices} layers: the best reachable is "
                        f"{fastest / latency.original_ms:.3f} of the original decode latency"
                        ) from exc
    ids = token_samples_up_to(loaded.tokenizer, opts.calib, 4, opts.seq_len, opts.seed + 1)
    tick = cb.progress("re-measuring the best groupings", len(candidates))
    measured = []
    for p in candidates:
        measured.append((grouping_kl(loaded.model, p.groups(), opts.bypass, ids), p))
        tick()
    measured.sort(key=lambda pair: pair[0])
    kl, best = measured[0]
    details = {
        "candidates": [{"groups": p.spec(), "predicted_kl_sum": p.cost, "measured_kl": k,
                        "steps": p.num_steps} for k, p in measured],
        "measured_kl": kl,
        "sensitivity_source": str(opts.report) if opts.report else "computed",
    }
    return best.groups(), details


def min_layers_ms(n: int, devices: int, latency) -> float:
    best = [0.0] + [float("inf")] * n
    for j in range(1, n + 1):
        for s in range(1, devices + 1):
            if j - s >= 0 and s in latency.step_ms:
                best[j] = min(best[j], best[j - s] + latency.step_ms[s])
    return best[n]


def choose_groups(loaded, opts: ConvertOptions, fraction, latency, cb: Callbacks):
    from ..calibrate.search import uniform_groups
    from ..runtime.checkpoint import parse_groups

    n = loaded.num_layers
    if opts.groups is not None:
        try:
            groups = parse_groups(opts.groups, n)
        except ValueError as exc:
            raise CqilError(f"bad --groups: {exc}") from exc
        return groups, {"source": "manual"}
    if opts.start is not None or opts.end is not None or opts.parallel is not None:
        if None in (opts.start, opts.end, opts.parallel):
            raise CqilError("--start, --end and --parallel go together")
        return uniform_groups(opts.start, opts.end, opts.parallel, n), {"source": "manual"}
    groups, details = search_grouping(loaded, opts, fraction, latency, cb)
    return groups, {"source": "search", **details}


# ---------------------------------------------------------------- placement


def placement(model, groups: list[list[int]], devices: int) -> dict:
    """Which rank holds which layers for P devices, with bytes per rank.

    Member j of each group goes to rank j, so a group's layers run at the same time; a single
    layer goes to the least-loaded rank (it runs alone either way). Embedding and head: rank 0.
    """
    def nbytes(module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    layers = model.model.layers
    ranks = [{"rank": r, "layers": [], "bytes": 0} for r in range(devices)]
    ranks[0]["bytes"] += nbytes(model.model.embed_tokens) + nbytes(model.model.norm)
    if not model.config.tie_word_embeddings:
        ranks[0]["bytes"] += nbytes(model.lm_head)
    for group in groups:
        if len(group) == 1:
            target = min(ranks, key=lambda r: r["bytes"])
            target["layers"].append(group[0])
            target["bytes"] += nbytes(layers[group[0]])
        else:
            for j, layer in enumerate(group):
                ranks[j % devices]["layers"].append(layer)
                ranks[j % devices]["bytes"] += nbytes(layers[layer])
    return {"ranks": ranks, "embedding_and_head": 0}


# ---------------------------------------------------------------- the pipeline


def run_convert(model_spec: str, opts: ConvertOptions, load_kwargs: dict, cb: Callbacks) -> dict:
    from ..calibrate.latency_model import measure_latency_model
    from ..calibrate.tuning import (
        TuneOptions,
        detach_lora,
        distill,
        perplexity,
        restore_bypass,
        snapshot_bypass,
    )
    from ..inputs.models import load_model, require_llama_family
    from ..inputs.text import token_samples_up_to
    from ..runtime.checkpoint import build_cqil_model

    if opts.strategy not in STRATEGIES:
        raise CqilError(f"strategy '{opts.strategy}' is not available ({', '.join(STRATEGIES)})")
    if opts.strategy != "cqil" and (opts.groups or opts.start is not None):
        raise CqilError("--groups and --start/--end/--parallel apply to --strategy cqil only")
    if opts.strategy == "skip" and opts.steps is not None and opts.steps < 2:
        raise CqilError(f"bad --steps {opts.steps}: layer skipping keeps at least 2 layers "
                        "(the first and the last)")
    if opts.strategy == "skip" and opts.report is not None:
        raise CqilError("--report applies to --strategy cqil and prune (skip chooses its layers "
                        "by rule, not by measurement)")
    if not 0 <= opts.prompt_tokens <= opts.seq_len - 2:
        raise CqilError(f"bad --eval-prompt {opts.prompt_tokens}: between 0 and {opts.seq_len - 2} "
                        f"(windows are {opts.seq_len} tokens)")
    if opts.devices < 1:
        raise CqilError(f"bad --devices {opts.devices}: at least 1")
    if opts.bypass < 0:
        raise CqilError(f"bad --bypass {opts.bypass}: 0 or more")
    fraction = budget_fraction(opts)
    check_output_dir(opts.out, opts.force)
    started = time.perf_counter()
    cb.status(f"loading {model_spec}")
    loaded = load_model(model_spec, **load_kwargs)
    require_llama_family(loaded, "convert")
    base = loaded.model
    if loaded.model_type == "cqil":
        raise CqilError(f"{model_spec} is already converted; convert its base model")
    eval_ids = token_samples_up_to(loaded.tokenizer, opts.eval, opts.eval_samples,
                                   opts.seq_len, opts.seed, min_samples=2)
    calib_ids = token_samples_up_to(loaded.tokenizer, opts.calib, opts.tune_samples,
                                    opts.seq_len, opts.seed, min_samples=4)
    ood_ids = (token_samples_up_to(loaded.tokenizer, opts.eval_ood, opts.eval_samples,
                                   opts.seq_len, opts.seed, min_samples=2)
               if opts.eval_ood else None)

    if opts.strategy in ("prune", "skip"):
        return _convert_depth(model_spec, loaded, opts, fraction, eval_ids, calib_ids, ood_ids,
                              cb, started)
    tick = cb.progress("measuring latency", 3 * max(1, opts.devices))
    latency = measure_latency_model(base, max(1, opts.devices), on_progress=tick)
    groups, choice = choose_groups(loaded, opts, fraction, latency, cb)
    if max(len(g) for g in groups) > opts.devices:
        raise CqilError(f"a group of {max(len(g) for g in groups)} layers needs --devices "
                        f"{max(len(g) for g in groups)} or more")

    cb.status("held-out perplexity of the original")
    p = opts.prompt_tokens
    ppl_original = perplexity(base, eval_ids, prompt_tokens=p)
    ood = {"original": _ppl(base, ood_ids, p)}
    model = build_cqil_model(base, groups, opts.bypass)
    ppl_untuned = perplexity(model, eval_ids, prompt_tokens=p)
    ood["untuned"] = _ppl(model, ood_ids, p)
    num_layers = loaded.num_layers
    del base, loaded.model  # the teacher is the converted model's own weights, run in sequence
    tune = TuneOptions(steps=opts.tune_steps, minutes=opts.tune_minutes,
                       lora_rank=opts.lora_rank, seed=opts.seed)
    tuned_info = {"steps": 0, "seconds": 0.0, "kept": False}
    ppl_tuned = ppl_untuned
    grouped = any(len(g) > 1 for g in groups)
    if grouped and (opts.tune_steps or 0) + (opts.tune_minutes or 0) > 0:
        saved = snapshot_bypass(model)
        cb.tune_start(opts.tune_steps, opts.tune_minutes)
        result = distill(model, calib_ids, tune, on_step=cb.tune_step)
        model.set_engine("reference")  # adapters are attached: the fused weights cannot see them
        candidate = perplexity(model, eval_ids, prompt_tokens=p)
        model.set_engine("fused")
        keep = candidate < ppl_untuned
        detach_lora(model, merge=keep)
        if not keep:
            restore_bypass(model, saved)
        model.model.refresh_fused()
        ppl_tuned = perplexity(model, eval_ids, prompt_tokens=p) if keep else ppl_untuned
        tuned_info = {**asdict(tune), "steps": result.steps,
                      "seconds": round(result.seconds, 1), "kept": keep,
                      "final_loss": result.losses[-1] if result.losses else None,
                      "precision": result.precision}
    ood["tuned"] = _ppl(model, ood_ids, p) if tuned_info["kept"] else ood["untuned"]

    manifest = {
        **common_manifest(model_spec, loaded, opts, eval_ids, calib_ids,
                          (ppl_original, ppl_untuned, ppl_tuned), tuned_info, started, ood),
        "steps": groups,
        "num_steps": len(groups),
        "num_layers": num_layers,
        "bypass_distance": opts.bypass,
        "devices": opts.devices,
        "placement": placement(model, groups, opts.devices),
        "predicted": {"latency_ratio": latency.ratio(groups),
                      "decode_ms_per_token": latency.predict_ms(groups),
                      "original_decode_ms_per_token": latency.original_ms,
                      "step_depth_ratio": len(groups) / num_layers,
                      "by_devices": {str(opts.devices): latency.ratio(groups)},
                      "latency_model": latency.to_json(),
                      "engine": "cqil fused (one device)"},
        "grouping": choice,
    }
    write_output(model, loaded.tokenizer, opts, manifest)
    return manifest


def _ppl(model, ids, prompt_tokens: int) -> float | None:
    from ..calibrate.tuning import perplexity

    return None if ids is None else perplexity(model, ids, prompt_tokens=prompt_tokens)


def common_manifest(model_spec, loaded, opts: ConvertOptions, eval_ids, calib_ids,
                    ppl: tuple[float, float, float], tuning: dict, started: float,
                    ood: dict) -> dict:
    """The manifest fields every strategy writes."""
    return {
        "cqil_version": __version__,
        "strategy": opts.strategy,
        "base_model": {"spec": model_spec, "name": loaded.name,
                       "path": str(loaded.path) if loaded.path else None,
                       "weights_sha256": safetensors_digests(loaded.path)},
        "quality": {"eval": opts.eval, "eval_tokens": int(eval_ids.numel()),
                    "prompt_tokens": opts.prompt_tokens,
                    "scored_tokens": int(eval_ids.shape[0] * (eval_ids.shape[1] - max(opts.prompt_tokens, 1))),
                    "ppl_original": ppl[0], "ppl_untuned": ppl[1], "ppl_tuned": ppl[2],
                    "ood": {"eval": opts.eval_ood, "ppl_original": ood["original"],
                            "ppl_untuned": ood["untuned"], "ppl_tuned": ood["tuned"]}},
        "calibration": {"spec": opts.calib, "fingerprint": fingerprint(calib_ids),
                        "samples": int(calib_ids.shape[0]), "seq_len": opts.seq_len,
                        "seed": opts.seed},
        "tuning": tuning,
        "seconds": round(time.perf_counter() - started, 1),
    }


def fingerprint(ids: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]


def write_output(model, tokenizer, opts: ConvertOptions, manifest: dict,
                 plain: bool = False) -> None:
    """Everything goes to a temporary sibling folder, renamed into place at the very end.

    plain=False writes a cqil checkpoint (config with auto_map, the runtime files); plain=True
    a base-architecture folder any tool loads. Both get the model card and the manifest.
    """
    from ..runtime.checkpoint import write_converted
    from ..runtime.manifest import write_manifest

    with staged_folder(Path(opts.out), replace=True) as folder:
        if plain:
            model.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
        else:
            write_converted(model, tokenizer, folder)
        (folder / "README.md").write_text(model_card(manifest))
        full = write_manifest(folder, manifest)
    manifest.clear()
    manifest.update(full)


def model_card(m: dict) -> str:
    q, p = m["quality"], m["predicted"]
    grouped = [f"{g[0]}-{g[-1]}" for g in m["steps"] if len(g) > 1]
    if m["strategy"] == "skip":
        method = (f"each generated token through {m['num_steps']} of the {m['num_layers']} layers "
                  f"(Unified Layer Skipping, Liu et al., 2024; the prompt runs through all of them). "
                  f"Skipped when decoding: {', '.join(map(str, m['skipped_layers']))}.")
    elif m["strategy"] == "prune":
        method = (f"{m['num_steps']} of the {m['num_layers']} layers kept (ShortGPT-style removal "
                  f"of the lowest block influence): removed {', '.join(map(str, m['removed_layers']))}. "
                  "A plain model: no custom code needed.")
    else:
        method = (f"{m['num_layers']} layers run in {m['num_steps']} sequential steps. Groups of "
                  "adjacent layers share their input and run concurrently (CQIL, Zou et al., ACL "
                  f"2024): {', '.join(grouped) or 'none'}; bypass distance {m['bypass_distance']}.")
    kind = {"cqil": "concurrent-layers", "skip": "layer-skipping", "prune": "layer-pruning"}
    tags = ", ".join(["cqil", kind.get(m["strategy"], m["strategy"]), "depth-reduction"])
    return f"""---
library_name: transformers
tags: [{tags}]
base_model: {m['base_model']['name']}
---
# {m['base_model']['name']} — cqil ({m['strategy']})

Converted by cqil {m['cqil_version']} from `{m['base_model']['spec']}`: {method}

| | value |
| --- | --- |
| predicted decode latency (cqil engine, one device) | {p['latency_ratio']:.3f} × the original |
| held-out perplexity, original | {q['ppl_original']:.3f} |
| held-out perplexity, converted before tuning | {q['ppl_untuned']:.3f} |
| held-out perplexity, converted after tuning | {q['ppl_tuned']:.3f} |

Held-out text: `{q['eval']}` ({q['eval_tokens']:,} tokens; scored: the tokens after the first
{q['prompt_tokens']} of each window, which serve as the prompt). Tuning: {m['tuning'].get('steps', 0)}
steps of distillation ({m['tuning'].get('seconds', 0)} s).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH")
```
`import cqil_cli` first and `trust_remote_code` is not needed. `manifest.json` records the
grouping, the device placement, the measurements and the sha256 of every file (cqil refuses a
changed file).
"""


def _kept_count(opts: ConvertOptions, fraction, latency, n: int) -> int:
    """How many layers a depth strategy (prune, skip) keeps for --steps or the budget."""
    if opts.steps is not None:
        keep = opts.steps
    else:
        per_layer = latency.step_ms[1]
        keep = math.floor((fraction * latency.original_ms - latency.outside_ms) / per_layer + 1e-9)
        if keep < 1:
            raise CqilError(f"the budget {fraction:.3f} cannot be met by {opts.strategy}: even one "
                            f"layer needs {(latency.outside_ms + per_layer) / latency.original_ms:.3f}")
    if not 1 <= keep <= n:
        raise CqilError(f"cannot keep {keep} of {n} layers")
    return keep


def _block_influence(loaded, opts: ConvertOptions, cb: Callbacks) -> list[float]:
    from ..calibrate.profile import AnalyzeOptions, analyze_model, progress_steps
    from ..inputs.text import token_samples_up_to

    n = loaded.num_layers
    if opts.report is not None:
        return load_report(opts.report, n, 1)["block_influence"]
    options = AnalyzeOptions(window=2, latency=False, sensitivity=False)
    ids = token_samples_up_to(loaded.tokenizer, opts.calib, opts.calib_samples, 128, opts.seed)
    tick = cb.progress("block influence", progress_steps(len(ids), options, n))
    return analyze_model(loaded, ids, options, lambda _label: tick())["block_influence"]


def _convert_depth(model_spec, loaded, opts: ConvertOptions, fraction, eval_ids, calib_ids,
                   ood_ids, cb: Callbacks, started: float) -> dict:
    """Depth strategies; both keep `keep` layers for decoding and write singles only.

    prune (ShortGPT): drop the layers of lowest block influence; write a plain
        base-architecture model. Tuned by distillation from the original (kept in memory:
        the pruned model no longer holds the removed layers).
    skip (Unified Layer Skipping): the paper's layer rule; the prompt runs through every
        layer, generated tokens through the kept ones, so the output is a cqil checkpoint
        (skip_layers) and the teacher is its own weights run in full.
    LoRA goes on the kept layers next to each removed run, for both.
    """
    import copy

    from ..calibrate.latency_model import measure_latency_model
    from ..calibrate.strategies import (
        neighbours_of_removed,
        prune_kept_layers,
        remove_layers,
        skip_kept_layers,
        skip_kept_layers_for_count,
    )
    from ..calibrate.tuning import (
        TuneOptions,
        detach_lora,
        distill_from_teacher,
        distill_skip,
        perplexity,
    )
    from ..runtime.checkpoint import build_cqil_model

    base, n, skip = loaded.model, loaded.num_layers, opts.strategy == "skip"
    tick = cb.progress("measuring latency", 3)
    latency = measure_latency_model(base, 1, on_progress=tick)
    if skip:
        if opts.speedup is not None:  # the paper's rule for a speed-up ratio r
            kept = skip_kept_layers(n, opts.speedup)
        else:
            kept = skip_kept_layers_for_count(n, _kept_count(opts, fraction, latency, n))
        selection = {"source": "unified layer skipping",
                     "speedup": opts.speedup if opts.speedup is not None else n / len(kept)}
    else:
        influence = _block_influence(loaded, opts, cb)
        kept = prune_kept_layers(influence, _kept_count(opts, fraction, latency, n))
        selection = {"source": "block influence", "block_influence": influence}
    keep = len(kept)
    removed = [i for i in range(n) if i not in kept]
    p = opts.prompt_tokens
    cb.status("held-out perplexity of the original")
    ppl_original = perplexity(base, eval_ids, prompt_tokens=p)
    ood = {"original": _ppl(base, ood_ids, p)}
    if skip:
        student = build_cqil_model(base, None, 0, skip_layers=removed)
        teacher = None  # the student's own weights, every layer, LoRA off
        lora_layers = [kept[i] for i in neighbours_of_removed(n, kept)]
        del base, loaded.model
    else:
        teacher = base
        student = copy.deepcopy(base)
        remove_layers(student, kept)
        lora_layers = neighbours_of_removed(n, kept)  # indices in the pruned model
    ppl_untuned = perplexity(student, eval_ids, prompt_tokens=p)
    ood["untuned"] = _ppl(student, ood_ids, p)
    tune = TuneOptions(steps=opts.tune_steps, minutes=opts.tune_minutes,
                       lora_rank=opts.lora_rank, seed=opts.seed)
    tuned_info = {"steps": 0, "seconds": 0.0, "kept": False}
    ppl_tuned = ppl_untuned
    if keep < n and (opts.tune_steps or 0) + (opts.tune_minutes or 0) > 0 and opts.lora_rank:
        cb.tune_start(opts.tune_steps, opts.tune_minutes)
        if skip:
            result = distill_skip(student, lora_layers, calib_ids, tune, p, on_step=cb.tune_step)
        else:
            result = distill_from_teacher(teacher, student, lora_layers, calib_ids, tune,
                                          on_step=cb.tune_step)
        if skip:
            student.set_engine("reference")  # adapters attached: the fused weights cannot see them
        candidate = perplexity(student, eval_ids, prompt_tokens=p)
        keep_tuned = candidate < ppl_untuned
        detach_lora(student, merge=keep_tuned)
        if skip:
            student.set_engine("fused")
            student.cqil_refresh_fused()
        ppl_tuned = candidate if keep_tuned else ppl_untuned
        tuned_info = {**asdict(tune), "steps": result.steps,
                      "seconds": round(result.seconds, 1), "kept": keep_tuned,
                      "lora_layers": lora_layers,
                      "final_loss": result.losses[-1] if result.losses else None,
                      "precision": result.precision}
    ood["tuned"] = _ppl(student, ood_ids, p) if tuned_info["kept"] else ood["untuned"]
    del teacher
    if not skip:
        del loaded.model, base
    predicted_ms = latency.outside_ms + keep * latency.step_ms[1]
    kept_bytes = sum(t.numel() * t.element_size() for t in student.parameters())
    manifest = {
        **common_manifest(model_spec, loaded, opts, eval_ids, calib_ids,
                          (ppl_original, ppl_untuned, ppl_tuned), tuned_info, started, ood),
        "steps": [[i] for i in kept],  # what each generated token runs through, in order
        "num_steps": keep,
        "num_layers": n,
        ("skipped_layers" if skip else "removed_layers"): removed,
        "bypass_distance": 0,
        "devices": 1,
        "placement": {"ranks": [{"rank": 0, "layers": list(range(n)) if skip else kept,
                                 "bytes": kept_bytes}],
                      "embedding_and_head": 0},
        "predicted": {"latency_ratio": predicted_ms / latency.original_ms,
                      "decode_ms_per_token": predicted_ms,
                      "original_decode_ms_per_token": latency.original_ms,
                      "step_depth_ratio": keep / n,
                      "latency_model": latency.to_json(),
                      "engine": "cqil fused (one device)"},
        "grouping": selection,
    }
    if skip:
        manifest["prompt"] = "every layer (decoding skips skipped_layers)"
    write_output(student, loaded.tokenizer, opts, manifest, plain=not skip)
    return manifest

