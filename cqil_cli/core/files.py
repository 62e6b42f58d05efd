"""Files cqil writes and checks: sha256 digests, and outputs that appear whole or not at all.

Every output (a converted folder, a JSON report, a PNG, a downloaded file, the materialised
default model) is written to a temporary sibling first and renamed into place at the very end,
so an error, Ctrl-C or SIGTERM never leaves half a result at the target. Temporary files and
folders are private (0600/0700); an output gets the permissions an ordinary file or folder
would have under the user's umask.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# Temporaries of outputs being written now: what a forced exit (cli/watchdog.py, a SIGTERM the
# main thread could not act on in time) removes before it ends the process.
IN_PROGRESS: set[Path] = set()


def remove_in_progress() -> None:
    """Remove every temporary of IN_PROGRESS (best effort: the process is about to end)."""
    for path in list(IN_PROGRESS):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        IN_PROGRESS.discard(path)


def check_folder_writable(folder: Path, what: str) -> None:
    """A one-line CqilError unless an output can be created in `folder` (tried for real: a
    temporary folder made and removed, since permission bits say little to root or on /proc)."""
    from .errors import CqilError

    folder = Path(folder)
    if not folder.is_dir():
        raise CqilError(f"cannot write {what}: folder {folder} does not exist")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cqil-write-check-", dir=folder))
    except OSError as exc:
        raise CqilError(f"cannot write {what}: {exc.strerror or exc} in {folder}") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safetensors_digests(folder: Path | str | None) -> dict[str, str]:
    """sha256 of every *.safetensors file of a folder, by file name ({} without a folder)."""
    if not folder:
        return {}
    return {p.name: sha256_file(p) for p in sorted(Path(folder).glob("*.safetensors"))}


def usual_permissions(path: Path) -> None:
    """Give path (recursively, for a folder) the permissions of an ordinary file or folder
    under the current umask, instead of the private ones of a temporary."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def staged_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; when the block ends normally it
    becomes `target` (an existing target is replaced only with replace=True, else
    FileExistsError). On any exception, KeyboardInterrupt or SystemExit included, nothing is
    left behind: neither the temporary folder nor a changed target."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    IN_PROGRESS.add(root)
    try:
        folder = root / "new"
        folder.mkdir()
        yield folder
        usual_permissions(folder)
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} already exists")
            os.replace(target, root / "previous")
        os.replace(folder, target)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        IN_PROGRESS.discard(root)


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(temporary path) and rename the result to path; nothing is left on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    IN_PROGRESS.add(Path(tmp))
    try:
        write(Path(tmp))
        usual_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        IN_PROGRESS.discard(Path(tmp))


def write_json_atomic(path: Path, data: dict) -> None:
    write_file_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))
