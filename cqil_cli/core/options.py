"""Options declared once: a dataclass field carries its command-line flag, help text, range,
choices and --help section (`option(...)`), the command line is generated from it
(cli/declare.py), and `check_ranges` checks every range with the same one-line message.

Torch-free on purpose: --help reads these declarations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from .errors import CqilError

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, flag: str | None = None,
           metavar: str | None = None, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, min_open: bool = False, max_open: bool = False,
           section: str | None = None, aliases: tuple[str, ...] = (),
           default_text: str | None = None, kind: type | None = None, short: str | None = None,
           default_factory=None):
    """A dataclass field that is also a command-line option.

    flag          the option's name (default: --FIELD-NAME with dashes)
    aliases       deprecated spellings: accepted with a one-line warning
    min, max      the range, checked by check_ranges (bounds included unless *_open)
    section       the --help heading it is listed under
    kind          int, float, str or bool when the default does not say (a None default)
    """
    metadata = {"help": help, "flag": flag, "metavar": metavar, "choices": choices,
                "min": min, "max": max, "min_open": min_open, "max_open": max_open,
                "section": section, "aliases": tuple(aliases), "default_text": default_text,
                "kind": kind, "short": short, "cli": True}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of an options dataclass that are command-line options, in order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def range_text(meta: dict) -> str | None:
    """'at least 1', 'between 0 and 5', 'a fraction in (0, 1)', or None without a range."""
    lo, hi = meta.get("min"), meta.get("max")
    if lo is None and hi is None:
        return None

    def num(x):
        return f"{x:g}" if isinstance(x, float) else str(x)

    if lo is not None and hi is not None:
        if meta.get("min_open") or meta.get("max_open"):
            left = "(" if meta.get("min_open") else "["
            right = ")" if meta.get("max_open") else "]"
            return f"in {left}{num(lo)}, {num(hi)}{right}"
        return f"between {num(lo)} and {num(hi)}"
    if lo is not None:
        return f"more than {num(lo)}" if meta.get("min_open") else f"at least {num(lo)}"
    return f"less than {num(hi)}" if meta.get("max_open") else f"at most {num(hi)}"


def in_range(value, meta: dict) -> bool:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_open") and value == lo)):
        return False
    if hi is not None and (value > hi or (meta.get("max_open") and value == hi)):
        return False
    return True


def check_ranges(options) -> None:
    """A one-line CqilError for the first option outside its declared range or choices."""
    for f in cli_fields(type(options)):
        value, meta = getattr(options, f.name), f.metadata
        if value is None or isinstance(value, bool):
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise CqilError(f"bad {flag_of(f)} '{value}': choose {', '.join(meta['choices'])}")
        if isinstance(value, (int, float)) and not in_range(value, meta):
            raise CqilError(f"bad {flag_of(f)} {value}: {range_text(meta)}")
