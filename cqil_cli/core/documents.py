"""The JSON documents cqil writes and reads back, and the check of their schema tag.

Four documents, each defined once as a typed class next to the code that writes it:
  cqil.analyze/1   analyze/profile.py   AnalyzeReport   `cqil analyze --json`, read by convert
  cqil.manifest/1  runtime/manifest.py    Manifest        manifest.json of a converted folder
  cqil.bench/1     bench/report.py        BenchReport     `cqil bench --json`
  cqil.generate/1  generate/run.py        GenerateResult  `cqil generate --json`
Each carries "schema": "NAME/VERSION". A reader checks the tag first (`Schema.check`): a
document of another kind, or of an older or newer version, is refused with one line that says
which, instead of failing later on a missing key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CqilError

_TAG = re.compile(r"^(?P<name>[a-z][a-z0-9_.-]*)/(?P<version>\d+)$")


@dataclass(frozen=True)
class Schema:
    name: str  # e.g. "cqil.analyze"
    version: int  # the version this cqil writes and reads
    what: str  # what a user calls it, e.g. "a `cqil analyze --json` report"
    remedy: str  # how to get a current one, e.g. "run `cqil analyze` again"
    oldest: int | None = None  # the oldest version this cqil still reads (None: only `version`)

    @property
    def tag(self) -> str:
        return f"{self.name}/{self.version}"

    def check(self, data: object, source: str) -> dict:
        """Return data (a dict with this schema's tag) or raise a one-line CqilError."""
        if not isinstance(data, dict):
            raise CqilError(f"{source}: not {self.what} (a JSON object was expected)")
        tag = data.get("schema")
        match = _TAG.match(tag) if isinstance(tag, str) else None
        if match is None or match["name"] != self.name:
            raise CqilError(f"{source}: not {self.what} (schema {tag!r}, expected {self.tag})")
        version = int(match["version"])
        if version < (self.oldest or self.version):
            raise CqilError(f"{source}: written by an older cqil (schema {tag}; this cqil reads "
                            f"{self.tag}): {self.remedy}")
        if version > self.version:
            raise CqilError(f"{source}: written by a newer cqil (schema {tag}; this cqil reads "
                            f"{self.tag}): upgrade cqil")
        return data

    def require(self, data: dict, keys: tuple[str, ...], source: str) -> None:
        missing = [k for k in keys if k not in data]
        if missing:
            raise CqilError(f"{source}: {self.what} without {', '.join(missing)} (damaged?)")


def read_json(path: Path, what: str) -> object:
    """Parse a JSON file, or raise a one-line CqilError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise CqilError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise CqilError(f"{path}: {what} is not valid JSON ({exc})") from exc
