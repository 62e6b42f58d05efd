"""`cqil convert`: one pipeline for every strategy (docs/convert.md).

    choose    the steps: cqil's grouping (by hand or searched under a budget), or the layers
              skip and prune keep (convert/choose.py)
    evaluate  held-out and out-of-domain perplexity of the original
    build     the converted model: a CqilForCausalLM with groups (cqil) or skip_layers (skip),
              or the base architecture without the removed layers (prune)
    evaluate  the same perplexities, untuned
    tune      in stages: local (each changed block reconstructed on cached activations,
              calibrate/reconstruct.py), then end-to-end KL (calibrate/tuning.py); each stage
              kept only if held-out perplexity improves on the best so far
    export    the folder, its model card and manifest, written atomically (convert/export.py)
Plain functions; the click command in cli/convert.py only gathers options and shows progress.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .. import __version__
from ..core.devices import release_freed_memory
from ..core.errors import CqilError
from ..runtime.manifest import Manifest
from .choose import (
    Callbacks,
    cqil_steps,
    measure_latency,
    predicted_record,
    prune_kept_layers_of,
    skip_kept_layers_of,
)
from .export import fingerprint, placement, write_output
from .options import ConvertOptions

__all__ = ["Callbacks", "ConvertOptions", "run_convert"]


@dataclass
class Conversion:
    """What a strategy built: the model to tune and write, and how to describe it."""

    model: object  # the converted (student) model
    steps: list[list[int]]  # what a generated token runs through, original layer numbers
    selection: dict  # how the steps were chosen (the manifest's "grouping")
    tune: Callable | None  # end to end: tune(TuneOptions, on_step) -> TuneResult; None: nothing
    plain: bool  # write the base architecture (prune) instead of a cqil checkpoint
    blocks: Callable | None = None  # the local stage's blocks: blocks() -> Blocks; None: none
    release: Callable | None = None  # frees what tuning needed (prune's teacher), after it
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

    def out_of_domain(self, model) -> float | None:
        from ..calibrate.evaluate import perplexity

        return None if self.ood_ids is None else \
            perplexity(model, self.ood_ids, prompt_tokens=self.prompt_tokens)

    def __call__(self, model) -> tuple[float, float | None]:
        """(held-out, out-of-domain) perplexity."""
        return self.held_out(model), self.out_of_domain(model)


def check_before_loading(model_spec: str, opts: ConvertOptions, load_kwargs: dict) -> None:
    """Everything that can be checked before the model loads, in seconds: the options, the
    output folder, the model spec and its files, the grouping and lengths against config.json
    (a local model), the --analysis report, the text specs, the device and dtype."""
    from ..inputs.models import peek_config, resolve_device, torch_dtype
    from ..inputs.specs import config_facts, linear_input_widths
    from ..inputs.text import check_text_spec

    opts.check()
    raw = peek_config(model_spec, load_kwargs.get("allow_pickle", False))
    if raw is not None:
        if raw.get("model_type") == "cqil":
            check_converted_input(model_spec, raw, opts)
        layers, positions = config_facts(raw)
        if layers:
            opts.check_model(layers, positions, linear_input_widths(raw))
    for spec in (opts.calib, opts.eval, opts.eval_ood):
        check_text_spec(spec)
    resolve_device(load_kwargs.get("device", "cpu"))
    torch_dtype(load_kwargs.get("dtype", "float32"))


def check_converted_input(model_spec: str, raw: dict, opts: ConvertOptions) -> None:
    """A converted folder is an input only to quantize it (--weights), as it is."""
    if not opts.weights:
        raise CqilError(f"{model_spec} is already converted; convert its base model (or pass "
                        "--weights int8|int4 to quantize it as it is)")
    if raw.get("weights"):
        raise CqilError(f"{model_spec} is already quantized ({raw['weights'].get('format')}); "
                        "convert its dense folder")
    given = [flag for flag, value in (("--budget", opts.budget), ("--speedup", opts.speedup),
                                      ("--steps", opts.steps), ("--groups", opts.groups),
                                      ("--start", opts.start)) if value is not None]
    if given or opts.strategy != "cqil":
        raise CqilError(f"{model_spec} is already converted: {', '.join(given) or '--strategy'} "
                        "cannot change it; --weights quantizes it as it is")


def run_convert(model_spec: str, opts: ConvertOptions, load_kwargs: dict,
                cb: Callbacks, checked: bool = False) -> Manifest:
    """The conversion (the module docstring); `checked`: check_before_loading has run."""
    from ..calibrate.self_text import calibration_windows
    from ..inputs.models import load_model, require_engine
    from ..inputs.specs import linear_input_widths
    from ..inputs.text import token_samples_up_to

    if not checked:
        check_before_loading(model_spec, opts, load_kwargs)
    fraction = opts.budget_fraction()
    started = time.perf_counter()
    cb.status(f"loading {model_spec}")
    loaded = load_model(model_spec, **load_kwargs)
    require_engine(loaded, "reference", f"'{loaded.spec}'")
    if loaded.model_type == "cqil":
        check_converted_input(model_spec, loaded.model.config.to_dict(), opts)
    opts.check_model(loaded.num_layers,
                     getattr(loaded.model.config, "max_position_embeddings", None),
                     linear_input_widths(loaded.model.config.to_dict()))

    def windows(spec, count, seed, least):
        return token_samples_up_to(loaded.tokenizer, spec, count, opts.window_len, seed,
                                   min_samples=least)

    eval_ids = windows(opts.eval, opts.eval_windows, opts.seed, 2)
    if opts.calib != opts.calib_text:
        cb.status(f"sampling calibration windows from the model ({opts.calib})")
    calib_ids = calibration_windows(loaded.model, loaded.tokenizer, opts.calib,
                                    opts.tune_windows, opts.window_len, opts.seed, 4)
    ood_ids = windows(opts.eval_ood, opts.eval_windows, opts.seed, 2) if opts.eval_ood else None
    p = opts.prompt_tokens
    quality_of = Scorer(eval_ids, ood_ids, p)
    if loaded.model_type == "cqil":  # quantize a converted folder as it is
        from .weights import requantize_folder

        return requantize_folder(loaded, opts, quality_of, calib_ids, cb, started)

    num_layers = loaded.num_layers  # the base model may be freed once converted
    latency, parallel = measure_latency(loaded, opts, cb)
    release_freed_memory()  # each phase frees about a model's worth of tensors: hand it back
    conversion, original = _build(loaded, opts, fraction, latency, calib_ids, cb, quality_of)
    release_freed_memory()
    model = conversion.model
    untuned = quality_of(model)
    tuned, tuning = untuned, {"steps": 0, "seconds": 0.0, "kept": False, "stages": []}
    if opts.tunes:
        tuned, tuning = _tune_stages(conversion, opts, untuned, quality_of, calib_ids, cb)
    if conversion.release is not None:
        conversion.release()
    conversion.tune = conversion.blocks = conversion.release = None  # what tuning needed
    weights = None
    if opts.weights:
        from .weights import as_cqil_runtime, weights_stage

        if conversion.plain:  # prune: a plain model cannot hold quantized layers
            model = conversion.model = as_cqil_runtime(model)
            conversion.plain = False
            release_freed_memory()
        dense = tuned
        tuned, weights = weights_stage(model, opts, calib_ids, quality_of, cb)
        weights.update(ppl_before=dense[0], ppl_ood_before=dense[1])

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
        predicted=predicted_record(latency, parallel, conversion.steps, conversion.bypass,
                                   conversion.devices, num_layers),
        quality={"eval": opts.eval, "eval_tokens": int(eval_ids.numel()),
                 "prompt_tokens": p,
                 "scored_tokens": int(eval_ids.shape[0] * (eval_ids.shape[1] - max(p, 1))),
                 "ppl_original": original[0], "ppl_untuned": untuned[0], "ppl_tuned": tuned[0],
                 "ood": {"eval": opts.eval_ood, "ppl_original": original[1],
                         "ppl_untuned": untuned[1], "ppl_tuned": tuned[1]}},
        calibration={"spec": opts.calib, "fingerprint": fingerprint(calib_ids),
                     "samples": int(calib_ids.shape[0]), "seq_len": opts.window_len,
                     "seed": opts.seed},
        tuning=tuning,
        grouping=conversion.selection,
        seconds=round(time.perf_counter() - started, 1),
        weights=weights,
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
    from ..calibrate.tuning import tune_from_teacher, tune_groups, tune_skip
    from ..runtime.checkpoint import build_cqil_model
    from .strategies import neighbours_of_removed, remove_layers
    from .strategy_blocks import cqil_blocks, prune_blocks, skip_blocks

    base, n = loaded.model, loaded.num_layers
    if opts.strategy == "cqil":
        steps, selection = cqil_steps(loaded, opts, fraction, latency, cb)
        widest = max(len(g) for g in steps)
        if widest > opts.group_size:
            raise CqilError(f"a group of {widest} layers needs --group-size {widest} or more")
    elif opts.strategy == "skip":
        kept, selection = skip_kept_layers_of(opts, fraction, latency, n)
    else:
        kept, selection = prune_kept_layers_of(loaded, opts, fraction, latency, cb)
    cb.status("held-out perplexity of the original")
    original = quality_of(base)

    if opts.strategy == "cqil":
        # consume: each base tensor is freed once copied, so the two are never both whole
        model = build_cqil_model(base, steps, opts.bypass, consume=True, packed=True)
        loaded.model = None  # the teacher is the converted model's own weights, run in sequence
        grouped = any(len(g) > 1 for g in steps)
        return Conversion(
            model, steps, selection, plain=False, devices=opts.group_size, bypass=opts.bypass,
            tune=(lambda tune, on_step, originals=(): tune_groups(
                model, calib_ids, tune, on_step=on_step, originals=originals))
            if grouped else None,
            blocks=(lambda: cqil_blocks(model, calib_ids)) if grouped else None,
            extra={}), original

    removed = [i for i in range(n) if i not in kept]
    steps = [[i] for i in kept]  # what each generated token runs through, in order
    lora_on_kept = neighbours_of_removed(n, kept)  # positions in `kept` next to a removed run
    runs_lora = len(kept) < n and opts.lora_rank > 0
    shorter = len(kept) < n  # something to reconstruct
    if opts.strategy == "skip":
        model = build_cqil_model(base, None, 0, skip_layers=removed, consume=True,
                                 packed=True)
        loaded.model = None  # the teacher: the same weights through every layer, LoRA off
        lora_layers = [kept[i] for i in lora_on_kept]
        return Conversion(
            model, steps, selection, plain=False,
            tune=(lambda tune, on_step, originals=(): tune_skip(
                model, lora_layers, calib_ids, tune, opts.prompt_tokens, on_step=on_step,
                originals=originals))
            if runs_lora else None,
            blocks=(lambda: skip_blocks(model, opts.prompt_tokens, calib_ids)) if shorter else None,
            placement_names=list(range(n)),
            extra={"skipped_layers": removed,
                   "prompt": "every layer (decoding skips skipped_layers)"},
            tuning_extra={"lora_layers": lora_layers}), original
    model = copy.deepcopy(base)  # the teacher stays: the pruned model lacks the removed layers
    remove_layers(model, kept)
    teacher = base

    def release():
        loaded.model = None  # the teacher is not needed after tuning

    return Conversion(
        model, steps, selection, plain=True,
        tune=(lambda tune, on_step, originals=(): tune_from_teacher(  # its own teacher
            teacher, model, lora_on_kept, calib_ids, tune, on_step=on_step))
        if runs_lora else None,
        blocks=(lambda: prune_blocks(teacher, model, kept, calib_ids)) if shorter else None,
        release=release,
        placement_names=kept,
        extra={"removed_layers": removed},
        tuning_extra={"lora_layers": lora_on_kept}), original


def _tune_stages(conversion: Conversion, opts: ConvertOptions, untuned, quality_of: Scorer,
                 calib_ids, cb: Callbacks) -> tuple[tuple, dict]:
    """Run the tuning stages of opts.stages in order, each kept only if held-out perplexity
    improves on the best so far (else its weights are restored exactly), so the result is never
    worse than the untuned model. --tune-minutes bounds them all: the local stage gets
    opts.local_share of it when e2e follows, e2e what is left. Returns ((held-out, ood) of the
    model as it now is, the manifest's tuning record)."""
    from ..calibrate.tuning import TuneOptions

    steps, minutes = opts.tune_bounds
    best, stages, record = untuned, [], {}
    originals = []  # what a kept local stage changed: the e2e teacher runs with these
    for name in opts.stages:  # the bound counts tuning time, not the perplexity measurements
        left = None if minutes is None else minutes - sum(s["seconds"] for s in stages) / 60
        if left is not None and left <= 0:
            break
        if name == "local" and conversion.blocks is not None:
            share = opts.local_share if "e2e" in opts.stages else 1.0
            bound = None if minutes is None else min(left, minutes * share)
            stage, best, originals = _local_stage(conversion, opts.local_options(bound), best,
                                                  quality_of, calib_ids, cb)
            record["local"] = {k: v for k, v in asdict(opts.local_options(bound)).items()
                               if k not in ("steps", "minutes", "seed")}
        elif name == "e2e" and conversion.tune is not None:
            stage, best, tune = _e2e_stage(conversion, TuneOptions(
                steps=steps, minutes=left, lora_rank=opts.lora_rank, seed=opts.seed),
                best, quality_of, cb, originals)
            record.update({**asdict(tune), "final_loss": stage.pop("final_loss"),
                           "precision": stage["precision"], **(conversion.tuning_extra or {})})
        else:
            continue
        stages.append(stage)
        release_freed_memory()
    if hasattr(originals, "close"):
        originals.close()  # the local stage's backup file
    record.update({"steps": sum(s["steps"] for s in stages),
                   "seconds": round(sum(s["seconds"] for s in stages), 1),
                   "kept": any(s["kept"] for s in stages), "stages": stages})
    return best, record


def _settle(model) -> None:
    """After weights changed in place: the cqil runtime's fused weights are rebuilt."""
    if hasattr(model, "set_engine"):  # a CqilForCausalLM (cqil, skip)
        model.set_engine("fused")
        model.cqil_refresh_fused()


def _stage_record(name: str, steps: int, seconds: float, loss_start, loss_end, quality,
                  keep: bool) -> dict:
    return {"name": name, "steps": steps, "seconds": round(seconds, 1),
            "loss_start": loss_start, "loss_end": loss_end,
            "ppl": quality[0], "ppl_ood": quality[1], "kept": keep}


def _local_stage(conversion: Conversion, options, best, quality_of: Scorer, calib_ids,
                 cb: Callbacks) -> tuple[dict, tuple, list]:
    """The local stage (calibrate/reconstruct.py), then keep-if-better. Returns (its record,
    the best quality so far, the weights it changed as they were before it, a ParameterBackup on
    disk, when kept, else []): the end-to-end stage's teacher must run the original weights, not
    the reconstructed ones. The caller closes the backup."""
    from ..calibrate.reconstruct import reconstruct, restore

    model = conversion.model
    blocks = conversion.blocks()
    cb.status(f"tuning, local stage: {len(blocks.blocks)} blocks reconstructed one by one "
              f"({options.params} weights)")
    total = len(blocks.blocks)
    tick = cb.progress("tuning: local reconstruction (blocks)", total)
    result = reconstruct(blocks, calib_ids, options, on_block=lambda index, record: tick())
    for _ in range(total - len(result.blocks)):
        tick()  # the bar ends; the status line below says what was left
    del blocks
    _settle(model)
    quality = quality_of(model)
    keep = quality[0] < best[0]
    if not keep:
        restore(result)
        _settle(model)
    originals = result.saved if keep and result.saved is not None else []  # read when needed
    stage = _stage_record("local", result.steps, result.seconds, result.loss_start,
                          result.loss_end, quality, keep)
    stage.update(loss=options.loss, params=options.params, precision=result.precision,
                 samples=result.samples, blocks=result.blocks)
    if len(result.blocks) < total:
        cb.status(f"local stage: time was up after {len(result.blocks)} of {total} blocks")
    return stage, (quality if keep else best), originals


def _e2e_stage(conversion: Conversion, tune, best, quality_of: Scorer, cb: Callbacks,
               originals=()) -> tuple[dict, tuple, object]:
    """The end-to-end KL stage (calibrate/tuning.py); keep only if held-out perplexity improves
    on `best`, else restore the weights exactly (bypass weights restored, LoRA dropped).

    Judged twice: with the adapters unmerged (a loss there drops them, no merge needed), then
    merged as they will be written, since merging rounds every weight it touches (in bf16 this
    can undo a small gain); a merge that lost is undone bit for bit from a backup on disk."""
    from ..calibrate.tuning import (
        ParameterBackup,
        detach_lora,
        lora_base_weights,
        restore_bypass,
        snapshot_bypass,
    )

    model = conversion.model
    on_cqil_runtime = hasattr(model, "set_engine")  # a CqilForCausalLM (cqil, skip)
    saved = snapshot_bypass(model) if on_cqil_runtime else []
    cb.tune_start(tune.steps, tune.minutes)
    result = conversion.tune(tune, cb.tune_step, originals=originals)
    if on_cqil_runtime:
        model.set_engine("reference")  # adapters attached: the fused weights cannot see them
    held_out = quality_of.held_out(model)
    keep = held_out < best[0]
    if not keep:  # recorded, then undone
        quality = (held_out, quality_of.out_of_domain(model))
        restore_bypass(model, saved)
        detach_lora(model, merge=False)
    else:
        backup = ParameterBackup(lora_base_weights(model))
        try:
            detach_lora(model, merge=True)
            _settle(model)
            quality = quality_of(model)  # what is written is what is measured
            keep = quality[0] < best[0]
            if not keep:  # the merge rounded the gain away
                backup.restore()
                restore_bypass(model, saved)
        finally:
            backup.close()
    _settle(model)
    stage = _stage_record("e2e", result.steps, result.seconds,
                          result.losses[0] if result.losses else None,
                          result.losses[-1] if result.losses else None, quality, keep)
    stage.update(precision=result.precision,
                 final_loss=result.losses[-1] if result.losses else None)
    return stage, quality if keep else best, tune
