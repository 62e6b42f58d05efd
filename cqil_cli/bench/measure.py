"""`cqil bench`: latency and quality of models side by side with a baseline.

The report (schema `cqil.bench/1`, docs/bench.md) has one entry per model as the user named it,
plus the baseline. Plain functions only; `bench_cli.py` is the thin click layer over `run_bench`.

Engines
  transformers  a plain checkpoint, run as its users run it today: the transformers model and
                `generate()` (dynamic cache), greedy, exactly --new-tokens tokens
  cqil          a converted folder (model_type "cqil"), run on cqil's fast path
                (fastgen.FastGenerator: static KV cache, fused groups); with --cqil-engine a
                plain Llama-family checkpoint also runs there, converted with every layer its
                own step, so the gain of the engine and the gain of the grouping separate
Latency
  For each batch size B: B different windows of --prompt-len tokens of the evaluation text.
  Every entry first runs --warmup times (reported apart as warmup_ms), then --repeats rounds
  in which every entry runs once, round-robin (the starting entry rotates each round), so slow
  drift (thermals, other processes) hits all entries alike. A clock reads
  time.perf_counter() after every generated token (synchronising CUDA first): the first
  interval is the prefill (prompt forward + first token), every later one a decode step.
Quality (teacher-forced, against the baseline, on --eval text)
  --eval-tokens tokens in windows of --eval-window tokens, batch by batch (no logits kept);
  the first --eval-prompt tokens of each window (default: half) are the prompt and are not
  scored, the rest is scored as the continuation a generation would produce (a
  layer-skipping model runs the prompt through every layer and the rest through its kept ones):
  perplexity from the model's own next-token loss, mean KL(baseline || model) per token, top-1
  next-token agreement; and greedy continuations (--greedy-tokens new tokens after each of
  --greedy-prompts prompts of --greedy-prompt-len tokens) identical to the baseline's.
"""

from __future__ import annotations

import math
import os
import platform
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import __version__
from ..core.devices import synchronize
from ..core.errors import CqilError
from ..core.files import safetensors_digests

SCHEMA = "cqil.bench/1"
ENGINES = ("transformers", "cqil")
_MB = 1024.0 * 1024.0


# ============================================================================ options


@dataclass
class BenchOptions:
    prompt_len: int = 128
    new_tokens: int = 32
    batches: tuple[int, ...] = (1,)
    repeats: int = 5
    warmup: int = 1
    eval_spec: str = "default:heldout"
    eval_tokens: int = 8192
    eval_window: int = 256
    eval_prompt: int | None = None  # leading tokens of a window that are prompt, not scored (None: half)
    eval_batch: int = 2  # windows per teacher-forced forward pass (memory, not results)
    greedy_prompts: int = 16
    greedy_prompt_len: int = 32
    greedy_tokens: int = 32
    seed: int = 0
    cqil_engine: bool = False  # also run plain checkpoints (and the baseline) on cqil's engine
    compile: bool = False  # torch.compile cqil's decode step
    latency: bool = True
    quality: bool = True

    def check(self) -> None:
        if self.prompt_len < 1:
            raise CqilError(f"bad --prompt-len {self.prompt_len}: it must be at least 1")
        if self.new_tokens < 2:
            raise CqilError(f"bad --new-tokens {self.new_tokens}: at least 2 are needed "
                            "(the first token belongs to the prefill)")
        if self.repeats < 1 or self.warmup < 0:
            raise CqilError("--repeats must be at least 1 and --warmup at least 0")
        if self.eval_window < 2:
            raise CqilError(f"bad --eval-window {self.eval_window}: it must be at least 2")
        if not 0 <= self.eval_prompt_tokens <= self.eval_window - 2:
            raise CqilError(f"bad --eval-prompt {self.eval_prompt_tokens}: between 0 and "
                            f"{self.eval_window - 2} for windows of {self.eval_window} tokens")
        if self.eval_tokens < self.eval_window:
            raise CqilError(f"bad --eval-tokens {self.eval_tokens}: it must be at least one "
                            f"window of {self.eval_window} tokens")
        if self.greedy_prompts < 1 or self.greedy_prompt_len < 1 or self.greedy_tokens < 1:
            raise CqilError("the greedy-continuation test needs at least 1 prompt of 1 token "
                            "and 1 new token")
        if not self.latency and not self.quality:
            raise CqilError("nothing to measure: both latency and quality are switched off")

    @property
    def eval_prompt_tokens(self) -> int:
        if self.eval_prompt is None:
            return max(0, min(self.eval_window // 2, self.eval_window - 2))
        return self.eval_prompt

    @property
    def eval_windows(self) -> int:
        return self.eval_tokens // self.eval_window


def parse_batches(text: str | int | list) -> tuple[int, ...]:
    """'1,4,8' -> (1, 4, 8). Positive integers, no repeats; anything else is a CqilError."""
    if isinstance(text, int):
        text = str(text)
    if isinstance(text, (list, tuple)):
        text = ",".join(str(t) for t in text)
    parts = [p.strip() for p in str(text).split(",")]
    sizes = []
    for part in parts:
        if not re.fullmatch(r"[0-9]+", part or "") or int(part) < 1:
            raise CqilError(f"bad batch list '{text}': expected positive integers separated by "
                            "commas, e.g. 1,4,8")
        if int(part) in sizes:
            raise CqilError(f"bad batch list '{text}': batch size {int(part)} is listed twice")
        sizes.append(int(part))
    return tuple(sizes)


# ============================================================================ statistics


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    data = sorted(float(v) for v in values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(values) -> dict:
    """{p50, p90, mean, stdev (sample, n-1), min, max, n} of a list of numbers."""
    data = [float(v) for v in values]
    n = len(data)
    if n == 0:
        nan = float("nan")
        return {"p50": nan, "p90": nan, "mean": nan, "stdev": nan, "min": nan, "max": nan, "n": 0}
    mean = sum(data) / n
    stdev = math.sqrt(sum((v - mean) ** 2 for v in data) / (n - 1)) if n > 1 else 0.0
    return {"p50": percentile(data, 50), "p90": percentile(data, 90), "mean": mean,
            "stdev": stdev, "min": min(data), "max": max(data), "n": n}


def ratio(a: float, b: float) -> float | None:
    if a is None or b is None or not (b > 0) or math.isnan(a) or math.isnan(b):
        return None
    return a / b


# ============================================================================ quality metrics


class QualityAccumulator:
    """Running sums of next-token metrics of one model against the baseline, per token.

    `update(base_logits, logits, targets)` takes [B, T, V] logits at the positions that predict
    `targets` [B, T]; sums are float64, so the order of batches does not matter.
    """

    def __init__(self) -> None:
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.tokens = 0

    @torch.no_grad()
    def update(self, base_logits: torch.Tensor | None, logits: torch.Tensor,
               targets: torch.Tensor, chunk: int = 64) -> None:
        V = logits.shape[-1]
        if base_logits is not None and base_logits.shape[-1] != V:
            raise CqilError(f"the model predicts {V} tokens but the baseline {base_logits.shape[-1]}"
                            ": their vocabularies differ")
        flat = logits.reshape(-1, V)
        base_flat = base_logits.reshape(-1, V) if base_logits is not None else None
        tgt = targets.reshape(-1).to(flat.device)
        for start in range(0, flat.shape[0], chunk):  # bounded temporaries: chunk × V fp32
            lp = F.log_softmax(flat[start:start + chunk].float(), dim=-1)
            t = tgt[start:start + chunk]
            self.nll += float(-lp.gather(1, t[:, None]).sum(dtype=torch.float64))
            if base_flat is None:  # the baseline itself
                self.agree += lp.shape[0]
            else:
                blp = F.log_softmax(base_flat[start:start + chunk].float().to(lp.device), dim=-1)
                kl = (blp.exp() * (blp - lp)).sum(-1)
                self.kl += float(kl.sum(dtype=torch.float64))
                self.agree += int((blp.argmax(-1) == lp.argmax(-1)).sum())
            self.tokens += lp.shape[0]

    def result(self) -> dict:
        n = max(self.tokens, 1)
        mean_nll = self.nll / n
        return {"ppl": math.exp(min(mean_nll, 700.0)), "nll": mean_nll,
                "kl": max(self.kl / n, 0.0), "top1_agreement": self.agree / n,
                "tokens": self.tokens}


def greedy_match(base_tokens: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    """(share of identical continuations, share of identical tokens), both [N, n_new]."""
    if base_tokens.shape != tokens.shape:
        raise ValueError(f"continuations differ in shape: {tuple(base_tokens.shape)} vs "
                         f"{tuple(tokens.shape)}")
    same = base_tokens.cpu() == tokens.cpu()
    return float(same.all(dim=1).float().mean()), float(same.float().mean())


# ============================================================================ memory


class PeakMemory:
    """Peak memory while a block runs.

    cuda: torch.cuda.max_memory_allocated (reset before the block): the peak of tensors the
          caching allocator handed out, weights of every loaded model included.
    cpu:  the process's peak resident set size (VmHWM from /proc/self/status, reset through
          /proc/self/clear_refs after glibc's malloc_trim returned freed pages to the system;
          where that is not possible, ru_maxrss, which cannot be reset), weights included.
    `peak_mb` is the absolute peak, `extra_mb` the peak above the level when the block began
    (the working memory of the run: activations, KV cache, logits).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        self.peak_mb = float("nan")
        self.extra_mb = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._resettable = _reset_rss_peak()
            if not self._resettable:
                self.kind = "cpu_max_rss_since_start"
            self._start = _rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_peak_bytes(self._resettable)
        self.peak_mb = peak / _MB
        self.extra_mb = max(peak - self._start, 0) / _MB
        return False


def _proc_status(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.M)
    return int(match.group(1)) * 1024 if match else None


def _reset_rss_peak() -> bool:
    _malloc_trim()  # hand freed heap pages back first, so the peak shows this run's own growth
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _proc_status("VmHWM") is not None
    except OSError:
        return False


def _malloc_trim() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_bytes() -> int:
    rss = _proc_status("VmRSS")
    if rss is not None:
        return rss
    return _ru_maxrss()


def _ru_maxrss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _rss_peak_bytes(resettable: bool) -> int:
    if resettable:
        peak = _proc_status("VmHWM")
        if peak is not None:
            return peak
    return _ru_maxrss()


# ============================================================================ runners



@dataclass
class Timing:
    prefill_s: float
    decode_s: list[float]
    total_s: float
    tokens: torch.Tensor  # [B, n_new]


class TransformersRunner:
    """A plain checkpoint as users run it: the transformers model and generate()."""

    engine = "transformers"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device

    def _config(self, new_tokens: int):
        from transformers import GenerationConfig

        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        # Greedy, exactly new_tokens tokens (min = max suppresses an early end-of-sequence).
        return GenerationConfig(do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad,
                                use_cache=True)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Timing:
        from transformers import StoppingCriteria, StoppingCriteriaList

        device = self.device
        stamps: list[float] = []

        class _Clock(StoppingCriteria):  # called once after every new token
            def __call__(self, input_ids, scores, **kwargs):
                synchronize(device)
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        ids = prompt.to(device)
        mask = torch.ones_like(ids)
        config = self._config(new_tokens)
        synchronize(device)
        start = time.perf_counter()
        out = self.model.generate(ids, attention_mask=mask, generation_config=config,
                                  stopping_criteria=StoppingCriteriaList([_Clock()]))
        synchronize(device)
        end = time.perf_counter()
        tokens = out[:, ids.shape[1]:]
        if tokens.shape[1] != new_tokens or len(stamps) != new_tokens:
            raise CqilError(f"generate() made {tokens.shape[1]} tokens instead of {new_tokens}")
        decode = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        return Timing(stamps[0] - start, decode, end - start, tokens)

    def greedy(self, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return self.generate(prompts, new_tokens).tokens

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, prompt_tokens: int = 0) -> torch.Tensor:
        """Teacher-forced logits [B, T, V]; the first prompt_tokens of ids are the prompt (which
        matters only to a layer-skipping model: it runs its prompt through every layer)."""
        from ..calibrate.tuning import prompt_kwargs

        extra = prompt_kwargs(self.model, prompt_tokens)
        return self.model(input_ids=ids.to(self.device), use_cache=False, **extra).logits


class CqilRunner(TransformersRunner):
    """cqil's fast path: fastgen's static-cache generation over the fused steps."""

    engine = "cqil"

    def __init__(self, model, tokenizer, compile: bool = False):
        from ..runtime.fastgen import FastGenerator

        self.generator = FastGenerator(model, compile=compile)  # converts a plain model
        super().__init__(self.generator.model, tokenizer)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Timing:
        ids = prompt.to(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        out = self.generator.generate(ids, torch.ones_like(ids), max_new_tokens=new_tokens)
        synchronize(self.device)
        end = time.perf_counter()
        if out.tokens.shape[1] != new_tokens:
            raise CqilError(f"cqil's engine made {out.tokens.shape[1]} tokens instead of "
                            f"{new_tokens}")
        # Time outside the generator's own clocks (input checks, cache set-up) joins the
        # prefill, as generate()'s set-up does on the transformers engine.
        prefill = (end - start) - sum(out.decode_s)
        return Timing(prefill, list(out.decode_s), end - start, out.tokens)


# ============================================================================ entries


@dataclass
class Entry:
    """One timed and evaluated row: a loaded model on one engine."""

    key: str  # unique within the run
    spec: str  # as the user wrote it
    role: str  # "model", "baseline", "engine_baseline"
    engine: str
    loaded: object  # models.LoadedModel
    runner: object
    label: str  # short name for the table and the chart
    quality_key: tuple = ()  # entries with the same key share their quality numbers
    latency: list = field(default_factory=list)  # one dict per batch size
    quality: dict | None = None


def is_converted(loaded) -> bool:
    return getattr(loaded, "model_type", None) == "cqil"


def engine_of(loaded) -> str:
    return "cqil" if is_converted(loaded) else "transformers"


def can_run_on_cqil(loaded) -> bool:
    from ..inputs.models import LLAMA_FAMILY

    return is_converted(loaded) or loaded.model_type in LLAMA_FAMILY


def make_runner(loaded, engine: str, compile: bool = False):
    if engine == "transformers":
        return TransformersRunner(loaded.model, loaded.tokenizer)
    if engine == "cqil":
        if not can_run_on_cqil(loaded):
            raise CqilError(f"'{loaded.spec}' ({loaded.model_type}) cannot run on cqil's engine: "
                            "it supports the Llama family (llama, mistral, qwen2, qwen3)")
        try:
            return CqilRunner(loaded.model, loaded.tokenizer, compile=compile)
        except ValueError as exc:
            raise CqilError(f"'{loaded.spec}' cannot run on cqil's engine: {exc}") from exc
    raise CqilError(f"unknown engine '{engine}' (choose {', '.join(ENGINES)})")


# ============================================================================ baseline


def _local_folder(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def base_model_of(spec: str) -> tuple[str | None, str | None]:
    """(base model spec, where it was found) for a converted folder; (None, None) otherwise.

    Looks at manifest.json's `base_model` (a string, or an object with `spec`, `path` or
    `name`), then config.json's `base_model` and `_name_or_path`.
    """
    folder = _local_folder(spec)
    if folder is None or not (folder / "config.json").is_file():
        return None, None
    from ..inputs.models import read_config
    from ..runtime.manifest import read_manifest

    config = read_config(folder)
    if config.get("model_type") != "cqil":
        return None, None
    manifest = read_manifest(folder) or {}
    base = manifest.get("base_model")
    candidates: list[str] = []
    if isinstance(base, str):
        candidates.append(base)
    elif isinstance(base, dict):
        for key in ("spec", "path", "name_or_path", "name", "model"):
            if isinstance(base.get(key), str) and base[key]:
                candidates.append(base[key])
    for value in candidates:
        if _loadable(value):
            return value, "manifest"
    if candidates:  # named but not found here: still the user's best hint
        return candidates[0], "manifest"
    for key in ("base_model", "_name_or_path"):
        value = config.get(key)
        if isinstance(value, str) and value and \
                Path(value).expanduser().resolve() != folder.resolve():
            return value, "config"
    return None, None


def base_weights_match(entry_loaded, baseline_loaded, cache: dict) -> bool | None:
    """Whether the baseline's weight files are the ones a converted folder was made from.

    None when it cannot be told (not a converted folder, no digests in its manifest, or a
    baseline without local safetensors files).
    """
    if not is_converted(entry_loaded) or entry_loaded.path is None:
        return None
    from ..runtime.manifest import read_manifest

    base = (read_manifest(entry_loaded.path) or {}).get("base_model")
    expected = base.get("weights_sha256") if isinstance(base, dict) else None
    folder = getattr(baseline_loaded, "path", None)
    if not expected or folder is None:
        return None
    key = str(folder)
    if key not in cache:
        cache[key] = safetensors_digests(folder)
    return cache[key] == expected if cache[key] else None


def _loadable(value: str) -> bool:
    from ..inputs.models import _looks_like_hub_id

    path = Path(value).expanduser()
    return value == "default" or path.exists() or _looks_like_hub_id(value)


def resolve_baseline(models: list[str], baseline: str | None) -> tuple[str, str]:
    """(baseline spec, source): the option, else the base model of the converted folders."""
    if baseline:
        return baseline, "option"
    found: dict[str, str] = {}
    for spec in models:
        base, where = base_model_of(spec)
        if base is not None:
            found.setdefault(base, where)
    if len(found) == 1:
        base, where = next(iter(found.items()))
        return base, where
    if len(found) > 1:
        raise CqilError("the converted folders name different base models "
                        f"({', '.join(sorted(found))}); choose one with --baseline MODEL")
    raise CqilError("no baseline: none of the models is a converted folder that names its base "
                    "model; pass --baseline MODEL")


# ============================================================================ tokens


def check_same_tokenizer(a, b, name_a: str, name_b: str) -> None:
    """Refuse a comparison whose token ids mean different things."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only = len(set(va) ^ set(vb))
        detail = (f"{len(va):,} vs {len(vb):,} tokens" if len(va) != len(vb) else
                  f"{only:,} tokens differ" if only else "the same tokens with different ids")
        raise CqilError(f"the tokenizers of '{name_a}' and '{name_b}' differ ({detail}); "
                        "quality and latency can only be compared on the same tokens")
    probe = "Shall I compare thee to a summer's day?\n  Thou art more lovely — 1911, naïve."
    if a(probe, add_special_tokens=False)["input_ids"] != b(probe,
                                                           add_special_tokens=False)["input_ids"]:
        raise CqilError(f"the tokenizers of '{name_a}' and '{name_b}' differ (same vocabulary, "
                        "different splitting); quality and latency can only be compared on the "
                        "same tokens")


def draw_windows(stream: torch.Tensor, count: int, length: int, seed: int,
                 what: str, spec: str, option: str) -> torch.Tensor:
    """count non-overlapping windows of length tokens, drawn deterministically for a seed."""
    from ..inputs.text import draw_windows as draw

    return draw(stream, count, length, seed, spec=spec, purpose=f"for {what}",
                hint=f"; too little evaluation text: use more or lower {option}")


@dataclass
class BenchTokens:
    eval_windows: torch.Tensor  # [W, eval_window]
    greedy_prompts: torch.Tensor  # [G, greedy_prompt_len]
    prompts: dict  # batch size -> [B, prompt_len]
    stream_tokens: int


def bench_tokens(tokenizer, options: BenchOptions) -> BenchTokens:
    from ..inputs.text import load_text, token_stream

    text = load_text(options.eval_spec)
    stream = token_stream(tokenizer, text)
    spec = options.eval_spec
    windows = torch.empty(0, options.eval_window, dtype=torch.long)
    greedy = torch.empty(0, options.greedy_prompt_len, dtype=torch.long)
    if options.quality:
        windows = draw_windows(stream, options.eval_windows, options.eval_window, options.seed,
                               f"--eval-tokens {options.eval_tokens}", spec, "--eval-tokens")
        greedy = draw_windows(stream, options.greedy_prompts, options.greedy_prompt_len,
                              options.seed + 1, f"{options.greedy_prompts} greedy prompts", spec,
                              "--greedy-prompts")
    prompts = {}
    if options.latency:
        biggest = max(options.batches)
        pool = draw_windows(stream, biggest, options.prompt_len, options.seed + 2,
                            f"batch {biggest}", spec, "--batch or --prompt-len")
        prompts = {b: pool[:b].clone() for b in options.batches}
    return BenchTokens(windows, greedy, prompts, stream.numel())


# ============================================================================ measuring


def run_latency(entries: list[Entry], tokens: BenchTokens, options: BenchOptions,
                advance: Callable[[str], None]) -> None:
    """Fill entry.latency: for each batch size, warm-up apart, then round-robin repeats."""
    for batch in options.batches:
        prompt = tokens.prompts[batch]
        prefill: dict[str, list] = {e.key: [] for e in entries}
        decode: dict[str, list] = {e.key: [] for e in entries}
        total: dict[str, list] = {e.key: [] for e in entries}
        warm: dict[str, list] = {e.key: [] for e in entries}
        memory: dict[str, PeakMemory] = {}
        for entry in entries:
            for _ in range(options.warmup):
                t = entry.runner.generate(prompt, options.new_tokens)
                warm[entry.key].append(t.total_s * 1000)
                advance(f"warm-up {entry.label} (batch {batch})")
        n = len(entries)
        for r in range(options.repeats):
            order = entries[r % n:] + entries[:r % n]
            for entry in order:
                device = entry.runner.device
                if entry.key not in memory:  # the first timed run also measures memory
                    memory[entry.key] = PeakMemory(device)
                    with memory[entry.key]:
                        t = entry.runner.generate(prompt, options.new_tokens)
                else:
                    t = entry.runner.generate(prompt, options.new_tokens)
                prefill[entry.key].append(t.prefill_s * 1000)
                decode[entry.key].extend(d * 1000 for d in t.decode_s)
                total[entry.key].append(t.total_s)
                advance(f"timing {entry.label} (batch {batch}, round {r + 1})")
        for entry in entries:
            total_p50 = percentile(total[entry.key], 50)
            dec = summarize(decode[entry.key])
            mem = memory[entry.key]
            entry.latency.append({
                "batch": batch,
                "prompt_len": options.prompt_len,
                "new_tokens": options.new_tokens,
                "prefill_ms": summarize(prefill[entry.key]),
                "decode_ms_per_token": dec,
                "total_ms": summarize([s * 1000 for s in total[entry.key]]),
                "tokens_per_s": batch * options.new_tokens / total_p50 if total_p50 > 0 else None,
                "decode_tokens_per_s": batch * 1000.0 / dec["p50"] if dec["p50"] > 0 else None,
                "warmup_ms": warm[entry.key],
                "peak_memory": {"kind": mem.kind, "peak_mb": mem.peak_mb, "extra_mb": mem.extra_mb},
            })


@torch.no_grad()
def run_quality(entries: list[Entry], baseline: Entry, tokens: BenchTokens,
                options: BenchOptions, advance: Callable[[str], None]) -> None:
    """Fill entry.quality for every entry (the baseline included), batch by batch."""
    distinct: dict[tuple, Entry] = {}
    for entry in [baseline] + entries:
        distinct.setdefault(entry.quality_key, entry)
    others = [e for k, e in distinct.items() if k != baseline.quality_key]
    acc = {k: QualityAccumulator() for k in distinct}
    p = options.eval_prompt_tokens
    start = max(p - 1, 0)  # the first scored prediction: the prompt's last position
    for batch in tokens.eval_windows.split(options.eval_batch):
        inputs, targets = batch[:, :-1], batch[:, 1:][:, start:]
        base_logits = baseline.runner.logits(inputs, p)[:, start:]
        acc[baseline.quality_key].update(None, base_logits, targets)
        for entry in others:
            acc[entry.quality_key].update(base_logits, entry.runner.logits(inputs, p)[:, start:], targets)
        del base_logits
        advance("quality: teacher-forced windows")
    base_greedy = baseline.runner.greedy(tokens.greedy_prompts, options.greedy_tokens).cpu()
    advance(f"quality: greedy continuations of {baseline.label}")
    results = {}
    for key, entry in distinct.items():
        quality = acc[key].result()
        if key == baseline.quality_key:
            seq, tok = 1.0, 1.0
        else:
            cont = entry.runner.greedy(tokens.greedy_prompts, options.greedy_tokens)
            seq, tok = greedy_match(base_greedy, cont)
            advance(f"quality: greedy continuations of {entry.label}")
        quality["greedy_match"] = seq
        quality["greedy_token_match"] = tok
        results[key] = quality
    for entry in [baseline] + entries:
        entry.quality = dict(results[entry.quality_key])


def progress_steps(plan: "BenchPlan", options: BenchOptions) -> int:
    """How many times run_bench calls `advance` (for a progress bar)."""
    timed = 1 + (plan.engine_baseline is not None) + len(plan.entries)
    steps = 0
    if options.latency:
        steps += len(options.batches) * timed * (options.warmup + options.repeats)
    if options.quality:
        keys = {plan.baseline.quality_key} | {e.quality_key for e in plan.entries}
        if plan.engine_baseline is not None:
            keys.add(plan.engine_baseline.quality_key)
        steps += -(-options.eval_windows // options.eval_batch) + len(keys)
    return steps


# ============================================================================ report


def device_info(device: str, dtype: str) -> dict:
    dev = torch.device(device)
    info = {"name": str(dev), "type": dev.type, "dtype": dtype, "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        info["description"] = torch.cuda.get_device_name(index)
    else:
        info["description"] = f"{platform.processor() or platform.machine()}, " \
                              f"{os.cpu_count()} CPU cores"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _entry_json(entry: Entry) -> dict:
    loaded = entry.loaded
    config = loaded.model.config
    groups = getattr(config, "groups", None) if is_converted(loaded) else None
    skipped = list(getattr(config, "skip_layers", None) or []) if is_converted(loaded) else []
    model = entry.runner.model
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {
        "model": entry.spec,
        "name": loaded.name,
        "engine": entry.engine,
        "model_type": loaded.model_type,
        "path": str(loaded.path) if loaded.path else None,
        "num_layers": int(config.num_hidden_layers),
        # sequential steps of a generated token: a layer-skipping model's prompt runs deeper
        "num_steps": (len(groups) if groups else int(config.num_hidden_layers)) - len(skipped),
        "groups": [g for g in groups if len(g) > 1] if groups else [],
        "skip_layers": skipped,
        "params": params,
        "weights_mb": weight_bytes / _MB,
        "latency": entry.latency[0] if entry.latency else None,
        "latency_by_batch": entry.latency,
        "quality": entry.quality,
    }
    return out


def _ratios(entry: dict, base: dict) -> dict:
    by_batch = []
    for mine, theirs in zip(entry["latency_by_batch"], base["latency_by_batch"], strict=True):
        by_batch.append({
            "batch": mine["batch"],
            "decode": ratio(mine["decode_ms_per_token"]["p50"], theirs["decode_ms_per_token"]["p50"]),
            "prefill": ratio(mine["prefill_ms"]["p50"], theirs["prefill_ms"]["p50"]),
            "tokens_per_s": ratio(mine["tokens_per_s"], theirs["tokens_per_s"]),
        })
    first = by_batch[0] if by_batch else {"decode": None, "prefill": None, "tokens_per_s": None}
    quality, base_quality = entry.get("quality"), base.get("quality")
    return {
        "decode": first["decode"],
        "prefill": first["prefill"],
        "tokens_per_s": first["tokens_per_s"],
        "ppl": ratio(quality["ppl"], base_quality["ppl"]) if quality and base_quality else None,
        "by_batch": by_batch,
    }


def assemble_report(entries: list[Entry], baseline: Entry, engine_baseline: Entry | None,
                    baseline_source: str, options: BenchOptions, device: str, dtype: str,
                    tokens: BenchTokens) -> dict:
    base = _entry_json(baseline)
    base["source"] = baseline_source
    eng = _entry_json(engine_baseline) if engine_baseline is not None else None
    for row in [base] + ([eng] if eng else []):
        row["ratio_to_baseline"] = _ratios(row, base)
    if eng:
        eng["ratio_to_baseline_same_engine"] = _ratios(eng, eng)
    base["ratio_to_baseline_same_engine"] = _ratios(base, base)
    results = []
    digests: dict = {}
    for entry in entries:
        row = _entry_json(entry)
        if is_converted(entry.loaded):
            row["base_weights_match"] = base_weights_match(entry.loaded, baseline.loaded, digests)
        row["ratio_to_baseline"] = _ratios(row, base)
        same = eng if (eng is not None and entry.engine == engine_baseline.engine) else (
            base if entry.engine == baseline.engine else None)
        row["ratio_to_baseline_same_engine"] = _ratios(row, same) if same else None
        results.append(row)
    settings = {k: v for k, v in asdict(options).items()}
    settings["batches"] = list(options.batches)
    settings["eval_windows"] = options.eval_windows if options.quality else 0
    settings["eval_prompt"] = options.eval_prompt_tokens
    settings["eval_text_tokens"] = tokens.stream_tokens
    return {
        "schema": SCHEMA,
        "cqil_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device_info(device, dtype),
        "settings": settings,
        "baseline": base,
        "engine_baseline": eng,
        "results": results,
    }


# ============================================================================ the whole run


@dataclass
class BenchPlan:
    """What will run: the entries, the baseline, and the engine baseline (or None)."""

    entries: list[Entry]
    baseline: Entry
    engine_baseline: Entry | None
    baseline_source: str


def plan_entries(models: list[str], baseline_spec: str, baseline_source: str,
                 options: BenchOptions, load: Callable[[str], object]) -> BenchPlan:
    """Load every distinct spec once and build the timed entries.

    Entries that name the same spec share one loaded model but are timed separately (so
    `MODEL --baseline MODEL` shows the noise floor). Tokenizers are compared with the baseline's.
    """
    cache: dict[str, object] = {}

    def get(spec: str):
        if spec not in cache:
            cache[spec] = load(spec)
        return cache[spec]

    runners: dict[tuple, object] = {}

    def runner_for(loaded, engine: str):
        key = (id(loaded), engine)
        if key not in runners:
            runners[key] = make_runner(loaded, engine, options.compile)
        return runners[key]

    base_loaded = get(baseline_spec)
    base_engine = engine_of(base_loaded)
    baseline = Entry("baseline", baseline_spec, "baseline", base_engine, base_loaded,
                     runner_for(base_loaded, base_engine), f"{baseline_spec} (baseline)",
                     (id(base_loaded), base_engine))
    engine_baseline = None
    if options.cqil_engine and base_engine != "cqil":
        if not can_run_on_cqil(base_loaded):
            raise CqilError(f"--cqil-engine: the baseline '{baseline_spec}' "
                            f"({base_loaded.model_type}) cannot run on cqil's engine")
        engine_baseline = Entry("baseline@cqil", baseline_spec, "engine_baseline", "cqil",
                                base_loaded, runner_for(base_loaded, "cqil"),
                                f"{baseline_spec} (baseline, cqil engine)",
                                (id(base_loaded), "cqil"))
    entries: list[Entry] = []
    for i, spec in enumerate(models):
        loaded = get(spec)
        check_same_tokenizer(base_loaded.tokenizer, loaded.tokenizer, baseline_spec, spec)
        engine = engine_of(loaded)
        label = spec if models.count(spec) == 1 else f"{spec} #{i + 1}"
        entries.append(Entry(f"model[{i}]", spec, "model", engine, loaded,
                             runner_for(loaded, engine), label, (id(loaded), engine)))
        if options.cqil_engine and engine != "cqil":
            if not can_run_on_cqil(loaded):
                raise CqilError(f"--cqil-engine: '{spec}' ({loaded.model_type}) cannot run on "
                                "cqil's engine (Llama family only)")
            entries.append(Entry(f"model[{i}]@cqil", spec, "model", "cqil", loaded,
                                 runner_for(loaded, "cqil"), f"{label} (cqil engine)",
                                 (id(loaded), "cqil")))
    return BenchPlan(entries, baseline, engine_baseline, baseline_source)


def run_bench(plan: BenchPlan, options: BenchOptions, device: str, dtype: str,
              advance: Callable[[str], None] | None = None) -> dict:
    """Measure every entry of the plan; returns the report (schema cqil.bench/1)."""
    options.check()
    advance = advance or (lambda _label: None)
    tokens = bench_tokens(plan.baseline.loaded.tokenizer, options)
    timed = [plan.baseline] + ([plan.engine_baseline] if plan.engine_baseline else []) \
        + plan.entries
    if options.latency:
        run_latency(timed, tokens, options, advance)
    if options.quality:
        extra = [plan.engine_baseline] if plan.engine_baseline else []
        run_quality(extra + plan.entries, plan.baseline, tokens, options, advance)
    return assemble_report(plan.entries, plan.baseline, plan.engine_baseline,
                           plan.baseline_source, options, device, dtype, tokens)


__all__ = ["SCHEMA", "BenchOptions", "BenchPlan", "Entry", "QualityAccumulator", "PeakMemory",
           "TransformersRunner", "CqilRunner", "parse_batches", "percentile", "summarize",
           "greedy_match", "resolve_baseline", "base_model_of", "check_same_tokenizer",
           "plan_entries", "run_bench", "assemble_report"]
