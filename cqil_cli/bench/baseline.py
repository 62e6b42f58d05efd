"""Which model a bench compares against, and whether a converted folder was made from it.

The baseline is --baseline MODEL; without it, the base model the converted folders name in
their manifest (docs/convert.md, "manifest") or config (docs/bench.md, "The baseline").
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import CqilError
from ..core.files import safetensors_digests
from .runners import is_converted

# The keys of a manifest's base_model object that name a loadable model, most specific first.
_BASE_MODEL_KEYS = ("spec", "path", "name_or_path", "name", "model")


def resolve_baseline(models: list[str], baseline: str | None) -> tuple[str, str]:
    """(baseline spec, source): the option, else the base model of the converted folders."""
    if baseline:
        return baseline, "option"
    found: dict[str, str] = {}
    for spec in models:
        base, where = base_model_of(spec)
        if base is not None:
            found.setdefault(base, where)
    if len(found) == 1:
        base, where = next(iter(found.items()))
        return base, where
    if len(found) > 1:
        raise CqilError("the converted folders name different base models "
                        f"({', '.join(sorted(found))}); choose one with --baseline MODEL")
    raise CqilError("no baseline: none of the models is a converted folder that names its base "
                    "model; pass --baseline MODEL")


def base_model_of(spec: str) -> tuple[str | None, str | None]:
    """(base model spec, where it was found) for a converted folder; (None, None) otherwise.

    Looks at manifest.json's `base_model` (an object with `spec`, `path` or `name`; a plain
    string from a hand-written manifest is taken as the spec), then config.json's `base_model`
    and `_name_or_path`.
    """
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        return None, None
    from ..inputs.models import read_config
    from ..runtime.manifest import read_manifest

    config = read_config(folder)
    if config.get("model_type") != "cqil":
        return None, None
    manifest = read_manifest(folder)
    base = manifest.base_model if manifest is not None else None
    candidates: list[str] = []
    if isinstance(base, str):
        candidates.append(base)
    elif isinstance(base, dict):
        candidates += [base[key] for key in _BASE_MODEL_KEYS
                       if isinstance(base.get(key), str) and base[key]]
    for value in candidates:
        if _loadable(value):
            return value, "manifest"
    if candidates:  # named but not found here: still the user's best hint
        return candidates[0], "manifest"
    for key in ("base_model", "_name_or_path"):
        value = config.get(key)
        if isinstance(value, str) and value and \
                Path(value).expanduser().resolve() != folder.resolve():
            return value, "config"
    return None, None


def base_weights_match(entry_loaded, baseline_loaded, cache: dict[str, dict]) -> bool | None:
    """Whether the baseline's weight files are the ones a converted folder was made from.

    None when it cannot be told (not a converted folder, no digests in its manifest, or a
    baseline without local safetensors files). cache: baseline folder -> its digests, so a
    baseline is hashed once per run.
    """
    if not is_converted(entry_loaded) or entry_loaded.path is None:
        return None
    from ..runtime.manifest import read_manifest

    manifest = read_manifest(entry_loaded.path)
    base = manifest.base_model if manifest is not None else None
    expected = base.get("weights_sha256") if isinstance(base, dict) else None
    folder = getattr(baseline_loaded, "path", None)
    if not expected or folder is None:
        return None
    key = str(folder)
    if key not in cache:
        cache[key] = safetensors_digests(folder)
    return cache[key] == expected if cache[key] else None


def _loadable(value: str) -> bool:
    from ..inputs.models import looks_like_hub_id

    path = Path(value).expanduser()
    return value == "default" or path.exists() or looks_like_hub_id(value)
