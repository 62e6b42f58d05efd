"""Scale: cqil's commands on random-weight models of published shapes, timed, with peak memory.

    python -m cqil_cli.benchmarks.scale make --shape llama-3.2-1b --out /tmp/l1b
    python -m cqil_cli.benchmarks.scale inputs --out DIR      # tokenizer + plain text to carry
    python -m cqil_cli.benchmarks.scale run /tmp/l1b --device cpu --json scale-1b.json

`make` writes a Hugging Face folder (config, generation config, sharded safetensors with an
index, the default model's tokenizer) whose weights are seeded random normals (std =
initializer_range; norms 1), drawn tensor by tensor directly in the target dtype and written
shard by shard: no fp32 copy, no whole-model copy in memory (peak ≈ one shard, --shard-gb).
The shapes are the published config.json files of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B,
written here from memory of those files (not downloaded); the tokenizer is SmolLM2's (49152
ids, all valid ids of the 128256-id vocabulary), so no Hub access is needed.

`run` starts each command as its own process (`python -m cqil_cli.benchmarks.scale _child ...`,
which runs `cqil` in-process and then reads its own VmHWM, core/devices.py peak_rss_bytes: the
peak of the command's address space after exec, not inherited from this parent), records
wall time and peak RSS (and the CUDA peak when the command used a GPU) beside the bounds of
docs/performance.md (Scale), and prints a markdown table and JSON.
Only the standard library is imported at the top: `run` stays a small parent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MB = 10**6
RESERVE_BYTES = 600 * MB  # the bounds' allowance for the interpreter, torch and tokenizer
BOUNDS = {"analyze": 1.3, "convert": 2.0, "bench": 1.15}  # x weight bytes (+ KV for bench)

_LLAMA3_COMMON = dict(
    hidden_act="silu", initializer_range=0.02, max_position_embeddings=131072,
    rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, bos_token_id=128000,
    eos_token_id=128001, vocab_size=128256, rope_theta=500000.0,
)
_LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # 1B and 3B
# From memory of the published config.json files (meta-llama/Llama-3.2-1B, -3B, Llama-3.1-8B).
SHAPES = {
    "llama-3.2-1b": dict(
        _LLAMA3_COMMON, num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, intermediate_size=8192, tie_word_embeddings=True,
        rope_scaling=_LLAMA32_ROPE),
    "llama-3.2-3b": dict(
        _LLAMA3_COMMON, num_hidden_layers=28, hidden_size=3072, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, intermediate_size=8192, tie_word_embeddings=True,
        rope_scaling=_LLAMA32_ROPE),
    "llama-3.1-8b": dict(
        _LLAMA3_COMMON, num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # For tests: the same family in miniature, with the default tokenizer's 49152 ids.
    "tiny": dict(
        _LLAMA3_COMMON, num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, tie_word_embeddings=True,
        vocab_size=49152, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")
SOURCE_FILE = "scale_source.json"  # what `make` built, and how


# ---------------------------------------------------------------- make


def _shards(entries: list[tuple[str, tuple, int]], shard_bytes: int) -> list[list]:
    """Greedy split of (name, shape, bytes) in order into shards of at most shard_bytes (a
    tensor larger than that gets a shard of its own)."""
    shards, current, size = [], [], 0
    for entry in entries:
        if current and size + entry[2] > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry[2]
    return shards + ([current] if current else [])


def make_model(shape: str, out: Path, dtype: str = "bfloat16", seed: int = 0,
               tokenizer_dir: Path | None = None, init_device: str = "cpu",
               shard_gb: float = 5.0, force: bool = False) -> dict:
    """Write a random-weight LlamaForCausalLM of SHAPES[shape] to `out` (atomically); returns
    the record written to out/scale_source.json."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from ..core.devices import peak_rss_bytes
    from ..core.errors import CqilError
    from ..core.files import staged_folder
    from ..inputs.models import default_model_dir, torch_dtype

    if shape not in SHAPES:
        raise CqilError(f"unknown shape '{shape}' (choose {', '.join(SHAPES)})")
    started = time.perf_counter()
    torch_type = torch_dtype(dtype)
    config = LlamaConfig(**SHAPES[shape])
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch_type
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)  # shapes and names only, no memory
    state = skeleton.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # save_pretrained writes a tied head once, as embed
    element = torch.tensor([], dtype=torch_type).element_size()
    entries = [(name, tuple(t.shape), t.numel() * element) for name, t in state.items()]
    del skeleton, state
    shards = _shards(entries, int(shard_gb * 1e9))
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else default_model_dir()
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise CqilError(f"{out} is not empty (use --force to replace it)")
    weight_map, index = {}, 0
    with staged_folder(out, replace=True) as staging:
        for shard, filename in zip(shards, names, strict=True):
            tensors = {}
            for name, size, _ in shard:
                if name.endswith("norm.weight"):  # RMSNorm weights start at 1, as in HF init
                    tensor = torch.ones(size, dtype=torch_type)
                else:
                    generator = torch.Generator(init_device).manual_seed(seed * 1_000_003 + index)
                    tensor = torch.empty(size, dtype=torch_type, device=init_device).normal_(
                        0.0, config.initializer_range, generator=generator).cpu()
                tensors[name] = tensor
                weight_map[name] = filename
                index += 1
            save_file(tensors, str(staging / filename), metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            total = sum(e[2] for e in entries)
            (staging / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        config.save_pretrained(staging)
        GenerationConfig.from_model_config(config).save_pretrained(staging)
        copied = [f for f in TOKENIZER_FILES if (tokenizer_dir / f).exists()]
        if "tokenizer.json" not in copied and "vocab.json" not in copied:
            raise CqilError(f"{tokenizer_dir}: no tokenizer files")
        for file in copied:
            shutil.copy2(tokenizer_dir / file, staging / file)
        record = {"shape": shape, "dtype": dtype, "seed": seed, "init_device": init_device,
                  "parameters": sum(_numel(e[1]) for e in entries),
                  "weight_bytes": sum(e[2] for e in entries), "shards": len(shards),
                  "tokenizer_from": str(tokenizer_dir),
                  "config_source": "published config.json, written from memory (no download)",
                  "seconds": round(time.perf_counter() - started, 1),
                  "peak_rss_bytes": peak_rss_bytes()}
        (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _numel(shape: tuple) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def write_inputs(out: Path) -> dict:
    """The default tokenizer's files (out/tokenizer/) and the default held-out text as one
    plain file (out/text.txt): what a machine without $CQIL_HOME needs for make and run."""
    from ..inputs.models import default_model_dir
    from ..inputs.text import load_text

    out = Path(out)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    source = default_model_dir()
    for file in TOKENIZER_FILES:
        if (source / file).exists():
            shutil.copy2(source / file, out / "tokenizer" / file)
    documents = load_text("default:heldout").documents
    (out / "text.txt").write_text("\n\n".join(documents))
    return {"tokenizer": str(out / "tokenizer"), "text": str(out / "text.txt"),
            "text_chars": sum(len(d) for d in documents)}


# ---------------------------------------------------------------- run


def weight_bytes(folder: Path) -> int:
    """Bytes of every tensor in the folder's safetensors files (from their headers)."""
    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0]
                     for k, v in header.items() if k != "__metadata__")
    return total


def kv_cache_bytes(config: dict, tokens: int, batch: int, element: int) -> int:
    """K and V of every layer for `tokens` positions: 2 · layers · kv heads · head dim."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return (2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim
            * tokens * batch * element)


def _groups_of(num_layers: int) -> str:
    """Two adjacent pairs in the middle of the model (the shape of a typical conversion)."""
    mid = num_layers // 2
    return f"{mid - 2}-{mid - 1},{mid}-{mid + 1}"


def command_lines(folder: Path, work: Path, args, num_layers: int) -> dict[str, list[str]]:
    text = args.text or "default"
    device = ["--device", args.device, "--dtype", args.dtype]
    return {
        "analyze": ["analyze", str(folder), *device, "--calib", text,
                    "--samples", str(args.samples), "--batch-size", str(args.samples),
                    "--seq-len", str(args.seq_len), "--window", str(args.window),
                    "--repeats", str(args.repeats), "--json", str(work / "analyze.json")],
        "convert": ["convert", str(folder), *device, "--out", str(work / "converted"),
                    "--force", "--groups", _groups_of(num_layers), "--group-size", "2",
                    "--tune-steps", str(args.tune_steps), "--local-windows",
                    str(args.local_windows), "--calib", text,
                    "--eval", args.text or "default:heldout",
                    "--eval-ood", "none" if args.text else "default:ood"],
        "bench": ["bench", str(folder), "--baseline", str(folder), *device,
                  "--prompt-len", str(args.seq_len),
                  "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                  "--warmup", "1", "--eval", args.text or "default:heldout",
                  "--eval-tokens", str(args.eval_tokens), "--eval-window", str(args.seq_len),
                  "--greedy-prompts", "1", "--greedy-tokens", str(args.new_tokens),
                  "--json", str(work / "bench.json")],
    }


def _uptime() -> str:
    """The 1, 5 and 15 minute load averages (the machine may be shared)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run_one(name: str, argv: list[str], work: Path, overrides: dict, timeout: float) -> dict:
    """One command in its own process; wall time from here, peak RSS from the child itself."""
    result_path = work / f"{name}.peak.json"
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "cqil_cli.benchmarks.scale", "_child", str(result_path),
           json.dumps(overrides if name == "convert" else {}), *argv]
    load = _uptime()
    started = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = _wait4(proc, timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            timed_out = True
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    child = json.loads(result_path.read_text()) if result_path.exists() else {}
    return {"command": name, "argv": ["cqil", *argv], "convert_overrides":
            overrides if name == "convert" else {}, "exit_code": proc.returncode,
            "timed_out": timed_out, "wall_seconds": round(seconds, 1), "loadavg_before": load,
            "peak_rss_bytes": child.get("peak_rss_bytes"),
            "ru_maxrss_bytes": usage.ru_maxrss * 1024,  # includes the parent at fork: a check
            "cuda_peak_bytes": child.get("cuda_peak_bytes"),
            "datasets_imported": child.get("datasets_imported"),
            "log": str(work / f"{name}.log")}


def _wait4(proc, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.2)


def run_scale(folder: Path, args) -> dict:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    source = json.loads((folder / SOURCE_FILE).read_text()) if (folder / SOURCE_FILE).exists() \
        else {}
    work = Path(args.work) if args.work else folder.with_name(folder.name + "-scale-run")
    work.mkdir(parents=True, exist_ok=True)
    weights = weight_bytes(folder)
    element = 2 if args.dtype.lower() in ("bfloat16", "bf16", "float16", "fp16", "half") else 4
    stored_element = 4 if config.get("dtype", config.get("torch_dtype")) == "float32" else 2
    weights = weights * element // stored_element  # the bytes in the dtype the commands use
    kv = kv_cache_bytes(config, max(args.seq_len + args.new_tokens, 2 * args.new_tokens), 1,
                        element)
    overrides = dict(item.split("=", 1) for item in args.convert_set.split(",") if item)
    overrides = {k: int(v) for k, v in overrides.items()}
    lines = command_lines(folder, work, args, int(config["num_hidden_layers"]))
    rows = []
    for name in [c.strip() for c in args.commands.split(",") if c.strip()]:
        if name not in lines:
            raise SystemExit(f"unknown command '{name}' (choose {', '.join(lines)})")
        row = run_one(name, lines[name], work, overrides, args.timeout)
        factor = BOUNDS[name]
        row["bound_bytes"] = int(factor * weights + (kv if name == "bench" else 0)
                                 + RESERVE_BYTES)
        row["bound"] = f"{factor} x weights" + (" + KV" if name == "bench" else "") + " + 600 MB"
        peak = row["peak_rss_bytes"]
        row["within_bound"] = None if peak is None else peak <= row["bound_bytes"]
        rows.append(row)
        print(table_line(row), flush=True)
    report = {"schema": "cqil.scale/1", "model": str(folder), "shape": source.get("shape"),
              "layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
              "dtype": args.dtype, "device": args.device, "weight_bytes": weights,
              "kv_cache_bytes": kv, "settings": {k: getattr(args, k) for k in (
                  "samples", "seq_len", "window", "repeats", "new_tokens", "eval_tokens",
                  "tune_steps", "local_windows", "text")}, "commands": rows}
    return report


TABLE_HEAD = ("| command | exit | wall s | peak RSS GB | bound GB | within | CUDA peak GB "
              "| load before |\n| --- | --- | --- | --- | --- | --- | --- | --- |")


def _gb(value) -> str:
    return "—" if value is None else f"{value / 1e9:.2f}"


def table_line(row: dict) -> str:
    return (f"| {row['command']} | {row['exit_code']}{' (timeout)' if row['timed_out'] else ''}"
            f" | {row['wall_seconds']} | {_gb(row['peak_rss_bytes'])} | "
            f"{_gb(row['bound_bytes'])} | {row['within_bound']} | "
            f"{_gb(row['cuda_peak_bytes'])} | {row['loadavg_before']} |")


def markdown(report: dict) -> str:
    head = (f"{report['shape'] or report['model']}: {report['layers']} layers, "
            f"{report['dtype']} on {report['device']}, weights {_gb(report['weight_bytes'])} GB, "
            f"KV {_gb(report['kv_cache_bytes'])} GB\n\n")
    return head + TABLE_HEAD + "\n" + "\n".join(table_line(r) for r in report["commands"])


# ---------------------------------------------------------------- the child process


def _child(result_path: str, overrides: str, argv: list[str]) -> None:
    """Run `cqil argv` in this process, then write its peak RSS (VmHWM) and CUDA peak."""
    code = 0
    try:
        if json.loads(overrides):
            _override_convert_options(json.loads(overrides))
        from ..cli.app import main

        sys.argv = ["cqil", *argv]
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        from ..core.devices import peak_rss_bytes

        cuda = None
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = int(torch.cuda.max_memory_allocated())
        Path(result_path).write_text(json.dumps({
            "exit_code": code, "peak_rss_bytes": peak_rss_bytes(), "cuda_peak_bytes": cuda,
            "datasets_imported": "datasets" in sys.modules}))
    sys.exit(code)


def _override_convert_options(overrides: dict) -> None:
    """Benchmark-only: ConvertOptions fields (window_len, eval_windows, tune_windows,
    calib_samples, ...) set for this process, so a large model on a slow CPU runs convert on
    few short windows. Recorded in the report beside the command line."""
    import dataclasses

    from ..cli import convert as cli_convert
    from ..convert.options import ConvertOptions

    known = {f.name for f in dataclasses.fields(ConvertOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"--convert-set: no ConvertOptions field {', '.join(unknown)}")
    build = cli_convert.build
    cli_convert.build = lambda cls, params, **fixed: dataclasses.replace(
        build(cls, params, **fixed), **overrides)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        _child(argv[1], argv[2], argv[3:])
    parser = argparse.ArgumentParser(prog="python -m cqil_cli.benchmarks.scale",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    make = sub.add_parser("make", help="write a random-weight model of a published shape")
    make.add_argument("--shape", required=True, choices=sorted(SHAPES))
    make.add_argument("--out", required=True, type=Path)
    make.add_argument("--dtype", default="bfloat16")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--tokenizer", type=Path, help="folder of tokenizer files "
                      "(default: the default model's, from $CQIL_HOME)")
    make.add_argument("--init-device", default="cpu", help="where the normals are drawn "
                      "(cuda is faster; the draws then differ from cpu's)")
    make.add_argument("--shard-gb", type=float, default=5.0)
    make.add_argument("--force", action="store_true")
    inputs = sub.add_parser("inputs", help="write the default tokenizer and held-out text as "
                            "plain files (to carry to a machine without $CQIL_HOME)")
    inputs.add_argument("--out", required=True, type=Path)
    run = sub.add_parser("run", help="analyze, convert, bench: wall time and peak RSS")
    run.add_argument("folder", type=Path)
    run.add_argument("--device", default="cpu")
    run.add_argument("--dtype", default="bfloat16")
    run.add_argument("--commands", default="analyze,convert,bench")
    run.add_argument("--text", help="a plain text file for --calib/--eval (default: the "
                     "default recipes; convert's --eval-ood is then none)")
    run.add_argument("--work", type=Path, help="outputs and logs (default: FOLDER-scale-run)")
    run.add_argument("--json", type=Path)
    run.add_argument("--samples", type=int, default=2, help="analyze: calibration samples")
    run.add_argument("--seq-len", type=int, default=16,
                     help="analyze --seq-len, bench --prompt-len and --eval-window")
    run.add_argument("--window", type=int, default=2, help="analyze --window")
    run.add_argument("--repeats", type=int, default=1, help="analyze and bench --repeats")
    run.add_argument("--new-tokens", type=int, default=8,
                     help="bench --new-tokens and --greedy-tokens")
    run.add_argument("--eval-tokens", type=int, default=64, help="bench --eval-tokens")
    run.add_argument("--tune-steps", type=int, default=2, help="convert --tune-steps")
    run.add_argument("--local-windows", type=int, default=4, help="convert --local-windows")
    run.add_argument("--convert-set", default="",
                     help="ConvertOptions fields, e.g. "
                     "window_len=16,eval_windows=2,tune_windows=4 (benchmark only)")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds per command")
    args = parser.parse_args(argv)
    from ..core.errors import CqilError

    try:
        _act(args)
    except CqilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _act(args) -> None:
    if args.action == "make":
        record = make_model(args.shape, args.out, args.dtype, args.seed, args.tokenizer,
                            args.init_device, args.shard_gb, args.force)
        print(json.dumps(record, indent=2))
    elif args.action == "inputs":
        print(json.dumps(write_inputs(args.out), indent=2))
    else:
        report = run_scale(args.folder, args)
        print(markdown(report))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
