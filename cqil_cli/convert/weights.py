"""`cqil convert --weights int8|int4`: the quantization stage, after tuning (docs/convert.md,
"Weights").

    weights_stage(model, opts, calib_ids, quality_of, cb)   quantize a converted model in place,
                                                            measure it; the manifest's record
    requantize_folder(loaded, opts, ...)                    MODEL is a converted folder: keep its
                                                            steps and tuning, quantize it

Quantization is the last change: tuning trains dense weights, and the codes are chosen for the
weights as tuned (GPTQ on the calibration windows as the tuned model sees them).
"""

from __future__ import annotations

import dataclasses

from ..core.errors import CqilError
from ..runtime.manifest import Manifest, read_manifest

# calibration windows per method, when --weight-windows is not given: measured on the default
# model (docs/quality.md, 2026-12-05): local trains ~20x more steps in its minutes on 16 windows
# than on 64 and recovers more; GPTQ's Hessians want many tokens
DEFAULT_WINDOWS = {"local": 16, "gptq": 64}


# the method when --weight-method is not given: the one that recovered most per minute on the
# default model (docs/quality.md, 2026-12-05): int4 local (+0.77 % held-out against GPTQ's
# +1.30 % on a tuned folder), int8 GPTQ (+0.16 % against local's +0.29 % on the original)
DEFAULT_METHOD = {"int4": "local", "int8": "gptq"}


def scheme_of(opts):
    from ..runtime.quant_cqil import WeightScheme

    group = opts.weight_group_size if opts.weights == "int4" else None
    method = opts.weight_method or DEFAULT_METHOD[opts.weights]
    return WeightScheme(opts.weights, group, head="int8", method=method)


def weights_stage(model, opts, calib_ids, quality_of, cb) -> tuple[tuple, dict]:
    """Quantize model's linears (opts.weights) in place; returns ((held-out, ood) perplexity
    after, the manifest's `weights` record)."""
    from ..calibrate.quantize import quantize_model

    scheme = scheme_of(opts)
    windows = calib_ids[: opts.weight_windows or DEFAULT_WINDOWS.get(scheme.method, 0)]
    label = f"weights: {scheme.format}" + (f", groups of {scheme.group_size}" if scheme.group_size else "")
    if scheme.method == "gptq":
        cb.status(f"{label}: GPTQ statistics over {windows.shape[0]} calibration windows")
        from ..calibrate.quantize import linear_targets

        batches = cb.progress("weights: calibration statistics (batches)", -(-windows.shape[0] // 4))
        layers = cb.progress("weights: GPTQ (layers)", len(linear_targets(model, scheme)))
        on_layer = lambda name: layers()  # noqa: E731
        record = quantize_model(model, scheme, windows, on_layer=on_layer, on_batch=batches)
    elif scheme.method == "local":
        from ..calibrate.quantize_local import quantize_local

        steps = len(model.config.groups)
        cb.status(f"{label}: {steps} steps trained with the rounding in the loop, "
                  f"{opts.weight_minutes:g} min over {windows.shape[0]} calibration windows")
        blocks = cb.progress("weights: local reconstruction (steps)", steps)
        record = quantize_local(model, scheme, windows, opts.weight_minutes, windows.shape[0],
                                on_block=lambda _k, _record: blocks())
    else:
        cb.status(f"{label}: round to nearest")
        record = quantize_model(model, scheme)
    if hasattr(model, "set_engine"):
        model.set_engine("fused")
    cb.status("held-out perplexity with the quantized weights")
    quality = quality_of(model)
    return quality, {**scheme.to_json(), **record, "windows": int(windows.shape[0])
                     if scheme.method in ("gptq", "local") else 0}


def as_cqil_runtime(model):
    """A plain transformers model (prune's output) as a CqilForCausalLM with every layer its own
    step, so that it can hold quantized layers (transformers' own classes cannot load them)."""
    from ..runtime.checkpoint import build_cqil_model

    return build_cqil_model(model, None, 0, consume=True)


def requantize_folder(loaded, opts, quality_of, calib_ids, cb, started: float) -> Manifest:
    """MODEL is a converted cqil folder: quantize its weights and write a new folder whose
    manifest is the old one with `weights` and the perplexities measured now."""
    import time

    from .export import placement, write_output

    model = loaded.model
    if getattr(model.config, "weights", None):
        raise CqilError(f"{loaded.spec} is already quantized ({model.config.weights['format']}); "
                        "convert its dense folder")
    old = read_manifest(loaded.path) if loaded.path else None
    if old is None:
        raise CqilError(f"{loaded.spec} has no manifest.json; quantize folders written by cqil convert")
    cb.status("held-out perplexity before quantizing")
    before = quality_of(model)
    after, record = weights_stage(model, opts, calib_ids, quality_of, cb)
    record.update(ppl_before=before[0], ppl_ood_before=before[1], source=str(loaded.path))
    quality = {**old.quality, "ppl_tuned": after[0],
               "ood": {**old.quality.get("ood", {}), "ppl_tuned": after[1]}}
    manifest = dataclasses.replace(
        old, quality=quality, weights=record,
        placement=placement(model, old.strategy, old.devices, None if old.strategy == "cqil"
                            else (old.placement.get("ranks") or [{}])[0].get("layers")),
        seconds=round(old.seconds + time.perf_counter() - started, 1), files={})
    return write_output(model, loaded.tokenizer, opts.out, manifest, plain=False)


__all__ = ["as_cqil_runtime", "requantize_folder", "scheme_of", "weights_stage"]
