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
from ..core.files import write_file_atomic, write_json_atomic
from .progress import open_progress


class State:
    def __init__(self, quiet: bool, debug: bool):
        self.quiet = quiet
        self.debug = debug
        self.out = Console(quiet=quiet)
        self.err = Console(stderr=True, quiet=quiet)

    def progress(self):
        """Progress bars on a terminal; plain lines (at least every 30 s) otherwise."""
        return open_progress(self.err, self.quiet)


# ---------------------------------------------------------------- shared options

def model_options(func):
    """--device, --dtype, --trust-remote-code, --allow-pickle: how to load a model."""
    for decorator in reversed([
        click.option("--device", default="auto", show_default=True,
                     help="cpu, cuda, cuda:N, mps, or auto (cuda when present)."),
        click.option("--dtype", default="float32", show_default=True,
                     help="float32, bfloat16 or float16."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Allow a model folder's own Python code to run."),
        click.option("--allow-pickle", is_flag=True,
                     help="Allow pickled weights (*.bin) when a folder has no safetensors."),
    ]):
        func = decorator(func)
    return func


def check_writable(path: str | None, what: str) -> Path | None:
    """Fail before the long work, not after it, when an output cannot be written."""
    if path is None:
        return None
    target = Path(path).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise CqilError(f"{what} path {target} is a folder; give a file name")
    if not parent.is_dir():
        raise CqilError(f"cannot write {what} to {target}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
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
            raise CqilError(f"--devices {devices} on cuda needs {local} GPUs on this machine; "
                            f"it has {gpus} (use --device cpu)")
        return "cuda"
    raise CqilError(f"--devices runs on cpu or cuda, not '{device}'")
