"""manifest.json of a converted folder: what it is, and the sha256 of every file in it.

`verify_folder` runs before a converted folder is loaded, so a changed or truncated file is
refused with a clear message instead of producing silently wrong outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

from .assets import sha256_file
from .errors import CqilError

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "cqil.manifest/1"


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder except the manifest itself, by relative path."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts
    }


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Write manifest.json with the digests of the folder's current files; returns it."""
    folder = Path(folder)
    full = {"schema": MANIFEST_SCHEMA, **manifest, "files": file_digests(folder)}
    (folder / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    return full


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CqilError(f"{path}: not valid JSON (the checkpoint is damaged)") from exc


def verify_folder(folder: Path) -> None:
    """Refuse a converted folder whose files differ from what its manifest recorded."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    expected = manifest.get("files", {})
    for name, digest in expected.items():
        path = Path(folder) / name
        if not path.is_file():
            raise CqilError(f"{folder}: {name} is missing (listed in {MANIFEST})")
        if sha256_file(path) != digest:
            raise CqilError(f"{folder}: {name} was changed or truncated since conversion "
                            f"(sha256 differs from {MANIFEST}); refusing to load it")
