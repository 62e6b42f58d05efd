"""manifest.json of a converted folder: what it is, how it was made, the sha256 of every file.

`Manifest` is the one definition of the document (schema cqil.manifest/1, docs/convert.md):
`cqil convert` builds one, `write_manifest` adds the digests of the folder's files, and
`read_manifest` / `verify_folder` check it when a folder is read. `verify_folder` runs before a
converted folder is loaded, so a changed or truncated file is refused with a clear message
instead of producing silently wrong outputs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..core.documents import Schema, read_json
from ..core.errors import CqilError
from ..core.files import sha256_file

MANIFEST = "manifest.json"
SCHEMA = Schema("cqil.manifest", 1, "a cqil manifest",
                "convert the model again with this cqil")
MANIFEST_SCHEMA = SCHEMA.tag


@dataclass
class Manifest:
    """What `cqil convert` records about a converted folder (docs/convert.md, "manifest").

    steps: the ordered steps a generated token runs through (each a list of layer indices; a
    group when longer than one). placement: which rank holds which layers. predicted: latency
    predictions; quality: held-out and out-of-domain perplexities (original, untuned, tuned);
    grouping: how the steps were chosen. Nested records stay plain JSON objects.
    """

    cqil_version: str
    strategy: str  # cqil | skip | prune
    base_model: dict  # spec, name, path, weights_sha256 {file: sha256}
    steps: list[list[int]]
    num_steps: int
    num_layers: int
    bypass_distance: int
    devices: int
    placement: dict
    predicted: dict
    quality: dict
    calibration: dict
    tuning: dict
    grouping: dict
    seconds: float = 0.0
    skipped_layers: list[int] | None = None  # skip: layers decoding does not run
    removed_layers: list[int] | None = None  # prune: layers the checkpoint no longer has
    prompt: str | None = None  # skip: how the prompt runs
    weights: dict | None = None  # --weights: format, group size, method, bytes, perplexity before
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256

    def to_json(self) -> dict:
        data = {"schema": SCHEMA.tag, **dataclasses.asdict(self)}
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_json(cls, data: object, source: str) -> Manifest:
        data = SCHEMA.check(data, source)
        names = {f.name for f in dataclasses.fields(cls)}
        required = tuple(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        SCHEMA.require(data, required, source)
        return cls(**{k: v for k, v in data.items() if k in names})


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder except the manifest itself, by relative path."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts
    }


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Write manifest.json with the digests of the folder's current files; returns the manifest
    with its `files` filled in."""
    folder = Path(folder)
    manifest = dataclasses.replace(manifest, files=file_digests(folder))
    (folder / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, None when it has none; a damaged or foreign one is a CqilError."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    return Manifest.from_json(read_json(path, "the manifest"), str(path))


def verify_folder(folder: Path) -> None:
    """Refuse a converted folder whose files differ from what its manifest recorded."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    for name, digest in manifest.files.items():
        path = Path(folder) / name
        if not path.is_file():
            raise CqilError(f"{folder}: {name} is missing (listed in {MANIFEST})")
        if sha256_file(path) != digest:
            raise CqilError(f"{folder}: {name} was changed or truncated since conversion "
                            f"(sha256 differs from {MANIFEST}); refusing to load it")
