"""Text in local files (.txt, .jsonl, .parquet, a folder of them, a saved datasets folder)
and on the Hugging Face Hub, as documents; each file checked for what it is (text in the
encoding given, not binary data). inputs/text.py turns a text spec into these documents."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import CqilError

TEXT_FIELDS = ("text", "content", "document")



_ENCODING = ["utf-8"]  # of .txt and .jsonl files: --encoding (use_encoding), UTF-8 by default


def current_encoding() -> str:
    return _ENCODING[0]


def use_encoding(name: str | None) -> None:
    """Read text files in this encoding from now on (--encoding); a CqilError for an unknown
    one."""
    import codecs

    name = name or "utf-8"
    try:
        codecs.lookup(name)
    except LookupError as exc:
        raise CqilError(f"bad --encoding '{name}': not an encoding Python knows (e.g. utf-8, "
                        "latin-1, cp1252, utf-16)") from exc
    _ENCODING[0] = name


def read_text_file(path: Path) -> str:
    """A text file's text, checked for what it is: binary data (a NUL byte, or mostly control
    bytes, in its first 8 KB) is refused, and so is text that is not in the encoding
    (--encoding, UTF-8 by default), naming the byte offset; never decoded into garbage."""
    data = path.read_bytes()
    encoding = _ENCODING[0]
    head = data[:8192]
    wide = encoding.lower().replace("_", "-").startswith(("utf-16", "utf-32"))
    if not wide and head:
        controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13, 27))
        if b"\0" in head or controls > len(head) // 10:
            offset = head.find(b"\0") if b"\0" in head else next(
                i for i, b in enumerate(head) if b < 32 and b not in (9, 10, 12, 13, 27))
            raise CqilError(f"{path} is not text: binary data (byte {offset} is 0x{head[offset]:02x}"
                            "); give a .txt, .jsonl or .parquet file of text")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        hint = ("pass --encoding with the file's encoding (e.g. --encoding latin-1) or convert "
                "it to UTF-8") if encoding.lower() in ("utf-8", "utf8") else \
            "check --encoding"
        raise CqilError(f"{path} is not valid {encoding} text at byte {exc.start} "
                        f"(0x{data[exc.start]:02x}): {hint}") from exc


def file_documents(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ".md", ".text", ""):
            return [read_text_file(path)]
        if suffix == ".jsonl":
            return _jsonl_documents(path)
        if suffix == ".parquet":
            return _parquet_documents(path)
    except OSError as exc:
        raise CqilError(f"cannot read {path}: {exc.strerror or exc}") from exc
    raise CqilError(f"{path}: unsupported text file (use .txt, .jsonl or .parquet)")


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(read_text_file(path).splitlines(), 1):
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


def folder_documents(folder: Path) -> list[str]:
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
            docs.extend(file_documents(file))
    if not docs:
        raise CqilError(f"{folder}: no .txt, .jsonl or .parquet files inside")
    return docs


def hub_documents(rest: str) -> list[str]:
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
