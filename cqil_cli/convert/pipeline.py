"""`cqil convert`: one pipeline for every strategy (docs/convert.md).

    choose    the steps: cqil's grouping (by hand or searched under a budget), or the layers
              skip and prune keep (convert/choose.py)
    evaluate  held-out and out-of-domain perplexity of the original
    build     the converted model: a CqilForCausalLM with groups (cqil) or skip_layers (skip),
              or the base architecture without the removed layers (prune)
    evaluate  the same perplexities, untuned
    tune      brief distillation (calibrate/tuning.py), kept only if held-out perplexity improves
    export    the folder, its model card and manifest, written atomically (convert/export.py)
Plain functions; the click command in cli/convert.py only gathers options and shows progress.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .. import __version__
from ..core.errors import CqilError
from ..runtime.manifest import Manifest
from .choose import Callbacks, cqil_steps, prune_kept_layers_of, skip_kept_layers_of
from .export import fingerprint, placement, write_output
from .options import ConvertOptions

__all__ = ["Callbacks", "ConvertOptions", "run_convert"]


@dataclass
class Conversion:
    """What a strategy built: the model to tune and write, and how to describe it."""

    model: object  # the converted (student) model
    steps: list[list[int]]  # what a generated token runs through, original layer numbers
    selection: dict  # how the steps were chosen (the manifest's "grouping")
    tune: Callable | None  # tune(TuneOptions, on_step) -> TuneResult; None: nothing to tune
    plain: bool  # write the base architecture (prune) instead of a cqil checkpoint
    devices: int = 1
    bypass: int = 0
    placement_names: list[int] | None = None  # the manifest's numbers of model.model.layers
    extra: dict = field(default_factory=dict)  # strategy-specific manifest fields
    tuning_extra: dict | None = None  # strategy-specific tuning record (e.g. LoRA layers)


@dataclass
class Scorer:
    """Perplexity of the continuation after a prompt_tokens-token prompt, on held-out windows
    [n, L] and (when given) out-of-domain ones."""

    eval_ids: object
    ood_ids: object | None
    prompt_tokens: int

    def held_out(self, model) -> float:
        from ..calibrate.evaluate import perplexity

        return perplexity(model, self.eval_ids, prompt_tokens=self.prompt_tokens)

    def __call__(self, model) -> tuple[float, float | None]:
        """(held-out, out-of-domain) perplexity."""
        from ..calibrate.evaluate import perplexity

        ood = None if self.ood_ids is None else \
            perplexity(model, self.ood_ids, prompt_tokens=self.prompt_tokens)
        return self.held_out(model), ood


def run_convert(model_spec: str, opts: ConvertOptions, load_kwargs: dict,
                cb: Callbacks) -> Manifest:
    from ..calibrate.latency_model import measure_latency_model
    from ..inputs.models import load_model, require_llama_family
    from ..inputs.text import token_samples_up_to

    opts.check()
    fraction = opts.budget_fraction()
    started = time.perf_counter()
    cb.status(f"loading {model_spec}")
    loaded = load_model(model_spec, **load_kwargs)
    require_llama_family(loaded, "convert")
    if loaded.model_type == "cqil":
        raise CqilError(f"{model_spec} is already converted; convert its base model")

    def windows(spec, count, seed, least):
        return token_samples_up_to(loaded.tokenizer, spec, count, opts.seq_len, seed,
                                   min_samples=least)

    eval_ids = windows(opts.eval, opts.eval_samples, opts.seed, 2)
    calib_ids = windows(opts.calib, opts.tune_samples, opts.seed, 4)
    ood_ids = windows(opts.eval_ood, opts.eval_samples, opts.seed, 2) if opts.eval_ood else None
    p = opts.prompt_tokens
    quality_of = Scorer(eval_ids, ood_ids, p)

    num_layers = loaded.num_layers  # the base model may be freed once converted
    max_group = opts.devices if opts.strategy == "cqil" else 1
    tick = cb.progress("measuring latency", 3 * max_group)
    latency = measure_latency_model(loaded.model, max_group, on_progress=tick)
    conversion, original = _build(loaded, opts, fraction, latency, calib_ids, cb, quality_of)
    model = conversion.model
    untuned = quality_of(model)
    tuned, tuning = untuned, {"steps": 0, "seconds": 0.0, "kept": False}
    if conversion.tune is not None and opts.tunes:
        tuned, tuning = _tune_keep_if_better(conversion, opts, untuned, quality_of, cb)
        conversion.tune = None  # releases what tuning needed (prune's teacher)

    predicted_ms = latency.predict_ms(conversion.steps)
    manifest = Manifest(
        cqil_version=__version__,
        strategy=opts.strategy,
        base_model={"spec": model_spec, "name": loaded.name,
                    "path": str(loaded.path) if loaded.path else None,
                    "weights_sha256": _base_digests(loaded)},
        steps=conversion.steps,
        num_steps=len(conversion.steps),
        num_layers=num_layers,
        bypass_distance=conversion.bypass,
        devices=conversion.devices,
        placement=placement(model, opts.strategy, conversion.devices,
                            conversion.placement_names),
        predicted={"latency_ratio": predicted_ms / latency.original_ms,
                   "decode_ms_per_token": predicted_ms,
                   "original_decode_ms_per_token": latency.original_ms,
                   "step_depth_ratio": len(conversion.steps) / num_layers,
                   "by_devices": {str(conversion.devices): predicted_ms / latency.original_ms},
                   "latency_model": latency.to_json(),
                   "engine": "cqil fused (one device)"},
        quality={"eval": opts.eval, "eval_tokens": int(eval_ids.numel()),
                 "prompt_tokens": p,
                 "scored_tokens": int(eval_ids.shape[0] * (eval_ids.shape[1] - max(p, 1))),
                 "ppl_original": original[0], "ppl_untuned": untuned[0], "ppl_tuned": tuned[0],
                 "ood": {"eval": opts.eval_ood, "ppl_original": original[1],
                         "ppl_untuned": untuned[1], "ppl_tuned": tuned[1]}},
        calibration={"spec": opts.calib, "fingerprint": fingerprint(calib_ids),
                     "samples": int(calib_ids.shape[0]), "seq_len": opts.seq_len,
                     "seed": opts.seed},
        tuning=tuning,
        grouping=conversion.selection,
        seconds=round(time.perf_counter() - started, 1),
        **conversion.extra,
    )
    return write_output(model, loaded.tokenizer, opts.out, manifest, plain=conversion.plain)


def _base_digests(loaded) -> dict:
    from ..core.files import safetensors_digests

    return safetensors_digests(loaded.path)


def _build(loaded, opts: ConvertOptions, fraction, latency, calib_ids, cb: Callbacks,
           quality_of: Scorer) -> tuple[Conversion, tuple[float, float | None]]:
    """Choose the steps, measure the original, build the converted model (strategy by strategy);
    returns the conversion and the original's (held-out, out-of-domain) perplexity.

    The original's quality is measured here, before a strategy may free the base model (cqil
    and skip tune against the converted model's own weights run in full: no second copy)."""
    from ..calibrate.strategies import neighbours_of_removed, remove_layers
    from ..calibrate.tuning import tune_from_teacher, tune_groups, tune_skip
    from ..runtime.checkpoint import build_cqil_model

    base, n = loaded.model, loaded.num_layers
    if opts.strategy == "cqil":
        steps, selection = cqil_steps(loaded, opts, fraction, latency, cb)
        widest = max(len(g) for g in steps)
        if widest > opts.devices:
            raise CqilError(f"a group of {widest} layers needs --devices {widest} or more")
    elif opts.strategy == "skip":
        kept, selection = skip_kept_layers_of(opts, fraction, latency, n)
    else:
        kept, selection = prune_kept_layers_of(loaded, opts, fraction, latency, cb)
    cb.status("held-out perplexity of the original")
    original = quality_of(base)

    if opts.strategy == "cqil":
        model = build_cqil_model(base, steps, opts.bypass)
        loaded.model = None  # the teacher is the converted model's own weights, run in sequence
        grouped = any(len(g) > 1 for g in steps)
        return Conversion(
            model, steps, selection, plain=False, devices=opts.devices, bypass=opts.bypass,
            tune=(lambda tune, on_step: tune_groups(model, calib_ids, tune, on_step=on_step))
            if grouped else None,
            extra={}), original

    removed = [i for i in range(n) if i not in kept]
    steps = [[i] for i in kept]  # what each generated token runs through, in order
    lora_on_kept = neighbours_of_removed(n, kept)  # positions in `kept` next to a removed run
    runs_lora = len(kept) < n and opts.lora_rank > 0
    if opts.strategy == "skip":
        model = build_cqil_model(base, None, 0, skip_layers=removed)
        loaded.model = None  # the teacher: the same weights through every layer, LoRA off
        lora_layers = [kept[i] for i in lora_on_kept]
        return Conversion(
            model, steps, selection, plain=False,
            tune=(lambda tune, on_step: tune_skip(model, lora_layers, calib_ids, tune,
                                                  opts.prompt_tokens, on_step=on_step))
            if runs_lora else None,
            placement_names=list(range(n)),
            extra={"skipped_layers": removed,
                   "prompt": "every layer (decoding skips skipped_layers)"},
            tuning_extra={"lora_layers": lora_layers}), original
    model = copy.deepcopy(base)  # the teacher stays: the pruned model lacks the removed layers
    remove_layers(model, kept)
    teacher = base

    def tune_pruned(tune, on_step):
        try:
            return tune_from_teacher(teacher, model, lora_on_kept, calib_ids, tune,
                                     on_step=on_step)
        finally:
            loaded.model = None  # the teacher is not needed after tuning
    return Conversion(
        model, steps, selection, plain=True, tune=tune_pruned if runs_lora else None,
        placement_names=kept,
        extra={"removed_layers": removed},
        tuning_extra={"lora_layers": lora_on_kept}), original


def _tune_keep_if_better(conversion: Conversion, opts: ConvertOptions, untuned,
                         quality_of: Scorer, cb: Callbacks) -> tuple[tuple, dict]:
    """Tune; keep the result only if held-out perplexity improves, else restore the untuned
    weights exactly (bypass weights restored, LoRA dropped). Returns ((held-out, ood), record)."""
    from ..calibrate.tuning import (
        TuneOptions,
        detach_lora,
        restore_bypass,
        snapshot_bypass,
    )

    model = conversion.model
    on_cqil_runtime = hasattr(model, "set_engine")  # a CqilForCausalLM (cqil, skip)
    saved = snapshot_bypass(model) if on_cqil_runtime else []
    steps, minutes = opts.tune_bounds
    tune = TuneOptions(steps=steps, minutes=minutes, lora_rank=opts.lora_rank, seed=opts.seed)
    cb.tune_start(steps, minutes)
    result = conversion.tune(tune, cb.tune_step)
    if on_cqil_runtime:
        model.set_engine("reference")  # adapters attached: the fused weights cannot see them
    keep = quality_of.held_out(model) < untuned[0]
    detach_lora(model, merge=keep)
    if not keep:
        restore_bypass(model, saved)
    if on_cqil_runtime:
        model.set_engine("fused")
        model.cqil_refresh_fused()
    tuned = quality_of(model) if keep else untuned  # what is written is what is measured
    record = {**asdict(tune), "steps": result.steps, "seconds": round(result.seconds, 1),
              "kept": keep, **(conversion.tuning_extra or {}),
              "final_loss": result.losses[-1] if result.losses else None,
              "precision": result.precision}
    return tuned, record

