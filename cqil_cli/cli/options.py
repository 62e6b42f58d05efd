"""What every command shares: the State (consoles, quiet, progress), the model-loading
options, output checks and writers. Commands import this module, never each other."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import click
from rich.console import Console

from ..core.errors import CqilError
from ..core.files import check_folder_writable, write_file_atomic, write_json_atomic
from .declare import CqilOption
from .progress import open_progress


class State:
    """The global flags (-q/--quiet, -v/--verbose, --debug; before or after the command's name)
    and the consoles they shape."""

    def __init__(self, quiet: bool = False, debug: bool = False, verbose: bool = False):
        self.quiet, self.debug, self.verbose = quiet, debug, verbose
        self.set()

    def set(self, **flags) -> None:
        for name, value in flags.items():
            setattr(self, name, value)
        self.out = Console(quiet=self.quiet)
        self.err = Console(stderr=True, quiet=self.quiet)

    def progress(self):
        """Progress bars on a terminal; plain lines (at least every 30 s) otherwise."""
        return open_progress(self.err, self.quiet)


# ---------------------------------------------------------------- shared options

WHERE = "Where to run"
OUTPUT = "Output"


def model_options(func=None, *, section: str = WHERE,
                  dtype_help: str = "float32, bfloat16 or float16."):
    """--device, --dtype, --trust-remote-code, --allow-pickle: how to load a model."""
    def decorate(func):
        for decorator in reversed([
            click.option("--device", default="auto", show_default=True, cls=CqilOption,
                         section=section,
                         help="cpu, cuda, cuda:N, mps, or auto (cuda when present)."),
            click.option("--dtype", default="float32", show_default=True, cls=CqilOption,
                         section=section, help=dtype_help),
            click.option("--trust-remote-code", is_flag=True, cls=CqilOption, section=section,
                         help="Allow a model folder's own Python code to run."),
            click.option("--allow-pickle", is_flag=True, cls=CqilOption, section=section,
                         help="Allow pickled weights (*.bin) when a folder has no "
                              "safetensors."),
        ]):
            func = decorator(func)
        return func
    return decorate(func) if func is not None else decorate


def encoding_option(func=None, *, section: str | None = None):
    """--encoding: of the text files a command reads (UTF-8 unless given)."""
    def decorate(func):
        return click.option(
            "--encoding", default="utf-8", show_default=True, cls=CqilOption, section=section,
            help="Encoding of .txt and .jsonl text files (e.g. latin-1, cp1252); text that is "
                 "not in it is refused, naming the byte.")(func)
    return decorate(func) if func is not None else decorate


def json_option(help_text: str, section: str = OUTPUT):
    return click.option("--json", "json_path", metavar="PATH", cls=CqilOption, section=section,
                        help=help_text)


def plot_option(help_text: str, section: str = OUTPUT):
    return click.option("--plot", "plot_path", metavar="PATH", cls=CqilOption, section=section,
                        help=help_text)


def use_encoding(name: str) -> None:
    from ..inputs.text_files import use_encoding as use

    use(name)


def check_model_spec(spec: str, allow_pickle: bool) -> dict | None:
    """The checks of a model spec that read no weights (inputs/models.py: peek_config): a
    missing path, a folder without config or weights, a corrupt safetensors header, a tampered
    converted folder; its config.json when it is local."""
    from ..inputs.models import peek_config

    return peek_config(spec, allow_pickle)


def check_positions(raw: dict | None, tokens: int, what: str) -> None:
    """A one-line error when `tokens` (an option's length) exceeds the model's positions."""
    from ..inputs.specs import config_facts

    positions = config_facts(raw)[1] if raw else None
    if positions and tokens > positions:
        raise CqilError(f"bad {what} {tokens}: at most {positions} tokens (the model's "
                        "positions, max_position_embeddings)")


def check_writable(path: str | None, what: str, suffix: str | None = None) -> Path | None:
    """Fail before the long work, not after it, when an output cannot be written (or, with
    `suffix`, would not be the kind of file asked for: a heatmap is a .png)."""
    if path is None:
        return None
    target = Path(path).expanduser()
    if target.is_dir():
        raise CqilError(f"{what} path {target} is a folder; give a file name")
    if suffix and target.suffix.lower() != suffix:
        raise CqilError(f"{what} is written as {suffix[1:].upper()}: give a file name ending "
                        f"in {suffix} (not {target.name})")
    check_folder_writable(target.parent if str(target.parent) else Path("."),
                          f"{what} to {target}")
    if target.exists() and not os.access(target, os.W_OK):
        raise CqilError(f"cannot write {what} to {target}: permission denied")
    return target


def write_outputs(state, report, json_target: Path | None, plot_target: Path | None,
                  draw, plot_label: str) -> None:
    """Write a report document (its to_json()) and its PNG (draw(report, path)) where asked,
    each atomically."""
    if json_target:
        write_json_atomic(json_target, report.to_json() if hasattr(report, "to_json") else report)
        state.err.print(f"report: {json_target}")
    if plot_target:
        write_file_atomic(plot_target, functools.partial(draw, report))
        state.err.print(f"{plot_label}: {plot_target}")


def use_all_cores() -> None:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))


def loading(state: State, what: str):
    """A spinner on stderr while something loads (nothing when quiet)."""
    return state.err.status(what) if not state.quiet else contextlib.nullcontext()


def rank_device(device: str, devices: int) -> str:
    """cpu (gloo) or cuda (NCCL, one GPU per local rank) for the ranks."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", devices))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return "cuda" if gpus >= local else "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        if gpus < local:
            raise CqilError(f"--ranks {devices} on cuda needs {local} GPUs on this machine; "
                            f"it has {gpus} (use --device cpu)")
        return "cuda"
    raise CqilError(f"--ranks runs on cpu or cuda, not '{device}'")
