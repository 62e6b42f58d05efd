"""Click options generated from the options dataclasses (core/options.py), so that each option
is written once, where its setting is defined: its flag, help, default, choices, range and
--help section. Also: --help in sections, deprecated spellings, and the global flags every
command accepts before or after its name.

    @click.command(cls=SectionedCommand)
    @dataclass_options(ConvertOptions)
    def convert(state, model, **params):
        opts = build(ConvertOptions, params)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from ..core.errors import CqilError
from ..core.options import cli_fields, flag_of, range_text


class CqilOption(click.Option):
    """A click option that knows its --help section."""

    def __init__(self, *args, section: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.section = section


class SectionedCommand(click.Command):
    """--help lists the options under their sections: those of `sections` first, in that
    order, then the others in the order they first appear; options without one come last,
    under "Other options"."""

    def __init__(self, *args, sections: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.sections = tuple(sections)

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list] = {name: [] for name in self.sections}
        for param in self.get_params(ctx):
            record = None if isinstance(param, click.Argument) else param.get_help_record(ctx)
            if record is not None:
                name = getattr(param, "section", None) or (
                    "Global options" if param.name == "help" else "Other options")
                sections.setdefault(name, []).append(record)
        for name in ("Global options", "Other options"):
            if name in sections:
                sections[name] = sections.pop(name)
        for name, records in sections.items():
            if not records:
                continue
            with formatter.section(name):
                formatter.write_dl(records)


def _kind(f: dataclasses.Field):
    meta = f.metadata
    if meta.get("kind") is not None:
        return meta["kind"]
    if f.default is not dataclasses.MISSING and f.default is not None:
        return type(f.default)
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if name in text.replace("| None", ""):
            return kind
    return str


def _option(f: dataclasses.Field, section: str | None):
    meta, kind = f.metadata, _kind(f)
    flag = flag_of(f)
    names = [flag, f.name] if not meta.get("short") else [meta["short"], flag, f.name]
    help_text = meta.get("help", "")
    limits = range_text(meta)
    if limits:
        help_text += f" ({limits})"
    default = None if f.default is dataclasses.MISSING else f.default
    kwargs = dict(cls=CqilOption, section=meta.get("section") or section, help=help_text,
                  metavar=meta.get("metavar"))
    if kind is bool:
        # a flag: --x sets True; a default-True setting is spelled --no-x and sets False
        kwargs.update(is_flag=True, default=default, flag_value=not default)
    else:
        if meta.get("choices"):
            kwargs["type"] = click.Choice(meta["choices"])
        elif kind in (int, float):
            kwargs["type"] = kind
        elif kind is tuple:
            kwargs["type"] = str
            default = ",".join(map(str, default)) if default is not None else None
        else:
            kwargs["type"] = str
        if isinstance(default, Path):
            default = str(default)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if meta.get("default_text"):
            kwargs["show_default"] = meta["default_text"]
        else:
            kwargs["show_default"] = default is not None
    decorators = [click.option(*names, **kwargs)]
    for alias in meta.get("aliases", ()):
        decorators.append(_deprecated(alias, f.name, flag, kind, kwargs.get("type")))
    return decorators


def _deprecated(alias: str, name: str, flag: str, kind, click_type):
    """A hidden option for an old spelling: one warning line, its value kept for build()."""

    def remember(ctx, param, value):
        if value is None or (kind is bool and not value):
            return
        click.echo(f"cqil: warning: {alias} is deprecated; use {flag}", err=True)
        ctx.meta.setdefault("cqil.deprecated", {})[name] = (alias, value)

    extra = dict(is_flag=True, default=False) if kind is bool else dict(type=click_type,
                                                                         default=None)
    key = "_deprecated_" + alias.lstrip("-").replace("-", "_")
    return click.option(alias, key, hidden=True, expose_value=False,
                        callback=remember, **extra)


def dataclass_options(cls, *, exclude: tuple[str, ...] = (), section: str | None = None):
    """A decorator adding one click option per command-line field of the dataclass `cls`
    (core.options.option), in the order of its fields."""
    def decorate(func):
        for f in reversed(cli_fields(cls)):
            if f.name in exclude:
                continue
            for decorator in reversed(_option(f, section)):
                func = decorator(func)
        return func
    return decorate


def build(cls, params: dict, **fixed):
    """An instance of `cls` from the command's parameters: its fields are taken out of `params`
    (a deprecated spelling counts where the new one was not given)."""
    ctx = click.get_current_context(silent=True)
    deprecated = ctx.meta.get("cqil.deprecated", {}) if ctx is not None else {}
    values = {}
    for f in cli_fields(cls):
        if f.name not in params or f.name in fixed:
            continue
        value = params.pop(f.name)
        if f.name in deprecated:
            alias, old = deprecated[f.name]
            source = ctx.get_parameter_source(f.name)
            if source is not None and source.name != "DEFAULT":
                raise CqilError(f"give {flag_of(f)} once (not also as {alias})")
            value = old
        if _kind(f) is tuple and isinstance(value, str):
            value = tuple(part.strip() for part in value.split(","))
        values[f.name] = value
    return cls(**values, **fixed)


# ---------------------------------------------------------------- global flags

GLOBAL_FLAGS = (
    (("-q", "--quiet"), "quiet", "No tables or progress bars (errors still show)."),
    (("-v", "--verbose"), "verbose",
     "Show the progress bars and warnings of transformers and the other libraries."),
    (("--debug",), "debug", "Show the full traceback of an error."),
)


def global_flags(func):
    """-q/--quiet, -v/--verbose and --debug on a command, so that they work after its name as
    well as before it (`cqil --debug convert …` and `cqil convert … --debug`)."""
    def set_flag(ctx, param, value):
        if value and ctx.obj is not None:
            ctx.obj.set(**{param.name: True})

    for names, name, help_text in reversed(GLOBAL_FLAGS):
        func = click.option(*names, name, is_flag=True, expose_value=False, callback=set_flag,
                            is_eager=True, help=help_text, cls=CqilOption,
                            section="Global options")(func)
    return func
