"""Greedy generation for `cqil generate` (docs/generate.md): on one device, or as one rank of W.

  generate_single(loaded, prompts, n)   one device: cqil's FastGenerator for a converted folder
                                        or a Llama-family model, transformers' generate() else
  generate_rank(request)                one rank of W (torch.distributed already described in
                                        the environment): load this rank's shard (load_rank_part:
                                        its slices only, from a local safetensors folder),
                                        DistributedCqil.generate; rank 0 returns the document,
                                        the other ranks None
  check_world_size(spec, W)             plan_layout's verdict from config.json alone, before any
                                        process starts

Every engine returns the same tokens for the same greedy run: each prompt's tokens end at its
first end-of-sequence token (included), whatever the engine did after it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..core.devices import peak_rss_bytes, synchronize
from ..core.documents import Schema
from ..core.errors import CqilError
from ..core.launch import COLLECTIVE_TIMEOUT_S

GENERATE_SCHEMA = Schema("cqil.generate", 1, "a `cqil generate --json` document",
                         "run `cqil generate` again")
FAIL_AFTER_PREFILL_ENV = "CQIL_GENERATE_FAIL_RANK"  # tests only: that rank exits after prefill


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (do_sample False), or drawn from
    softmax(logits / temperature) limited to the top_k tokens and the top_p mass, with a
    generator seeded by `seed` (runtime/distributed_cqil.py: next_tokens)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def kwargs(self) -> dict:
        return dict(do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, seed=self.seed)

    def to_json(self) -> dict | None:
        return self.kwargs() if self.do_sample else None


@dataclass
class GenerateRequest:
    """What every rank needs to run the same generation (picklable: it crosses processes)."""

    spec: str  # the model, as the user wrote it
    prompts: list[str]
    new_tokens: int
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (NCCL, cuda:LOCAL_RANK) on the ranks
    dtype: str = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class GenerateResult:
    """The cqil.generate/1 document."""

    model: str
    engine: str  # "cqil", "transformers" or "cqil-distributed"
    device: str
    devices: int  # W, the number of ranks (1: single device)
    prompts: list[str]
    new_tokens: int  # the most tokens asked for per prompt
    tokens: list[list[int]]  # new token ids per prompt, ending at the first eos (included)
    texts: list[str]  # their decoded text
    timings: dict = field(default_factory=dict)  # prefill_ms, decode_ms_per_token, ...
    # with W ranks: [{"rank": r, "bytes": weight bytes read, "peak_rss_bytes": the process's}]
    ranks: list[dict] | None = None
    sampling: dict | None = None  # Sampling.to_json(): None when greedy

    def to_json(self) -> dict:
        document = {"schema": GENERATE_SCHEMA.tag, "model": self.model, "engine": self.engine,
                    "device": self.device, "devices": self.devices, "prompts": self.prompts,
                    "new_tokens": self.new_tokens, "tokens": self.tokens, "texts": self.texts,
                    "timings": self.timings}
        for key in ("ranks", "sampling"):
            if getattr(self, key) is not None:
                document[key] = getattr(self, key)
        return document

    @classmethod
    def from_json(cls, data: dict) -> GenerateResult:
        data = GENERATE_SCHEMA.check(data, "generation result")
        return cls(**{k: v for k, v in data.items() if k != "schema"})


# ---------------------------------------------------------------------------- shared pieces


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one left-padded batch: ids [B, T] and mask [B, T] (1 = token)."""
    if not prompts:
        raise CqilError("give at least one --prompt")
    if tokenizer.pad_token is None:  # padding needs an id; it is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    if batch["input_ids"].shape[1] == 0 or bool((batch["attention_mask"].sum(1) == 0).any()):
        raise CqilError("a prompt has no tokens; give some text")
    return batch["input_ids"], batch["attention_mask"]


def stop_ids(model) -> list[int]:
    """The end-of-sequence ids of the model's generation config (or config), maybe none."""
    return eos_ids(getattr(model, "generation_config", None), model.config)


def eos_ids(generation_config, config) -> list[int]:
    """The eos_token_id of the generation config (None: absent), else of the model config, as
    a list (maybe empty)."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in ([eos] if isinstance(eos, int) else eos)]


def pad_id(tokenizer, stops: list[int]) -> int:
    """The id that follows a finished sequence's eos (dropped from the result anyway)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return stops[0] if stops else 0


def cut_at_stop(tokens: torch.Tensor, stops: list[int]) -> list[list[int]]:
    """tokens [B, n] -> per row, the ids up to and including its first stop id."""
    rows = []
    for row in tokens.tolist():
        for i, t in enumerate(row):
            if t in stops:
                row = row[: i + 1]
                break
        rows.append(row)
    return rows


def decode_texts(tokenizer, rows: list[list[int]]) -> list[str]:
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


def timings_of(prefill_s: float, decode_s: list[float], total_s: float) -> dict:
    """prefill (prompt forward + first token), median decode time per later token, total."""
    ordered = sorted(decode_s)
    return {"prefill_ms": 1000.0 * prefill_s,
            "decode_ms_per_token": 1000.0 * ordered[len(ordered) // 2] if ordered else None,
            "decode_tokens": len(decode_s), "total_ms": 1000.0 * total_s}


class CallTimer:
    """Wraps a forward callable and records the duration of every call, in seconds (the first
    call is the prefill, each later one a decode step)."""

    def __init__(self, fn, device):
        self.fn, self.device, self.durations = fn, device, []

    def __call__(self, *args, **kwargs):
        synchronize(self.device)
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        synchronize(self.device)
        self.durations.append(time.perf_counter() - start)
        return out


def _require_rank_model(model_type: str | None, spec: str) -> None:
    """Only what cqil's distributed engine runs can be spread over ranks."""
    from ..inputs.models import LLAMA_FAMILY, runs_on_cqil_engine

    if not runs_on_cqil_engine(model_type):
        raise CqilError(f"--devices runs converted or Llama-family models "
                        f"({', '.join(LLAMA_FAMILY)}); '{spec}' is '{model_type}'")


# ---------------------------------------------------------------------------- one device


def generate_single(loaded, prompts: list[str], new_tokens: int,
                    sampling: Sampling = Sampling()) -> GenerateResult:
    """Continuations of prompts (one left-padded batch) on the model's own device."""
    from ..inputs.models import runs_on_cqil_engine

    model, tokenizer = loaded.model, loaded.tokenizer
    ids, mask = encode_prompts(tokenizer, prompts)
    stops = stop_ids(model)
    pad = pad_id(tokenizer, stops)
    device = next(model.parameters()).device
    start = time.perf_counter()
    if runs_on_cqil_engine(loaded.model_type):
        from ..runtime.fastgen import FastGenerator

        engine = "cqil"
        try:
            out = FastGenerator(model).generate(ids, mask, max_new_tokens=new_tokens,
                                                eos_token_id=stops or None, pad_token_id=pad,
                                                **sampling.kwargs())
        except (ValueError, NotImplementedError) as exc:
            raise CqilError(f"'{loaded.spec}' cannot run on cqil's engine: {exc}") from exc
        tokens, prefill_s, decode_s = out.tokens, out.prefill_s, list(out.decode_s)
    else:
        engine = "transformers"
        timer = _time_forward_calls(model, device)
        try:
            with torch.no_grad():
                if sampling.do_sample:
                    torch.manual_seed(sampling.seed)
                sequences = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device),
                    max_new_tokens=new_tokens, eos_token_id=stops or None, pad_token_id=pad,
                    do_sample=sampling.do_sample,
                    **({"temperature": sampling.temperature, "top_k": sampling.top_k or 0,
                        "top_p": sampling.top_p or 1.0} if sampling.do_sample else {}))
        finally:
            timer.remove()
        tokens = sequences[:, ids.shape[1]:]
        prefill_s, decode_s = (timer.durations[0] if timer.durations else 0.0), timer.durations[1:]
    total_s = time.perf_counter() - start
    rows = cut_at_stop(tokens.cpu(), stops)
    return GenerateResult(loaded.name, engine, str(device), 1, list(prompts), new_tokens, rows,
                          decode_texts(tokenizer, rows), timings_of(prefill_s, decode_s, total_s),
                          sampling=sampling.to_json())


def _time_forward_calls(model, device):
    """Forward hooks that record each forward call's duration in .durations; .remove() ends."""
    state = SimpleNamespace(durations=[], start=0.0)

    def before(module, args):
        synchronize(device)
        state.start = time.perf_counter()

    def after(module, args, output):
        synchronize(device)
        state.durations.append(time.perf_counter() - state.start)

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    state.remove = lambda: [h.remove() for h in handles]
    return state


# ---------------------------------------------------------------------------- W ranks


def check_world_size(spec: str, world_size: int, trust_remote_code: bool = False) -> None:
    """A one-line CqilError when W ranks cannot run this model (plan_layout's verdict), from the
    folder's config files alone, before any process starts; a model that is not a local folder
    (a .gguf file, a hub id) is checked by the ranks themselves."""
    from ..inputs.models import local_model_folder, read_config

    if world_size < 1:
        raise CqilError(f"--devices must be at least 1, got {world_size}")
    folder = local_model_folder(spec)
    if folder is None:
        return
    kind = read_config(folder).get("model_type")
    _require_rank_model(kind, spec)
    config, _ = _folder_config_and_stops(folder, kind, trust_remote_code)
    _plan(config, world_size, spec)


def generate_rank(request: GenerateRequest) -> dict | None:
    """This process's part of a W-rank generation (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment): load the model, take this rank's shard, run DistributedCqil.generate.

    Returns the cqil.generate/1 document on rank 0 and None on the others.
    """
    return _generate_rank(request, int(os.environ.get("RANK", "0")))


def _generate_rank(request: GenerateRequest, rank: int) -> dict | None:
    import torch.distributed as dist

    from ..runtime.distributed_cqil import DistributedCqil, init_distributed

    world_size = int(os.environ["WORLD_SIZE"])
    if request.device == "cpu":  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(
            os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    # Load first (no collective waits on a slow load), then join the process group.
    part = load_rank_part(request, rank, world_size)
    rank, world_size, device = init_distributed(request.device, COLLECTIVE_TIMEOUT_S)
    try:
        engine = DistributedCqil(part.shard.to(device))
        read_bytes = _gather_ints(part.bytes_read, world_size, device)
        tokenizer, stops = part.tokenizer, part.stops
        ids, mask = encode_prompts(tokenizer, request.prompts)
        timer = CallTimer(engine.forward, device)
        engine.forward = _fail_after_prefill(timer, rank)
        start = time.perf_counter()
        out = engine.generate(ids, mask, max_new_tokens=request.new_tokens,
                              eos_token_id=stops or None, pad_token_id=pad_id(tokenizer, stops),
                              **request.sampling.kwargs())
        total_s = time.perf_counter() - start
        peaks = _gather_ints(peak_rss_bytes(), world_size, device)
        if rank != 0:
            return None
        rows = cut_at_stop(out.tokens.cpu(), stops)
        durations = timer.durations
        return GenerateResult(
            part.name, "cqil-distributed", device.type, world_size, list(request.prompts),
            request.new_tokens, rows, decode_texts(tokenizer, rows),
            timings_of(durations[0], durations[1:], total_s),
            ranks=[{"rank": r, "bytes": b, "peak_rss_bytes": m}
                   for r, (b, m) in enumerate(zip(read_bytes, peaks, strict=True))],
            sampling=request.sampling.to_json()).to_json()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class RankPart:
    """What one rank loaded before joining the process group."""

    shard: object  # its CqilShard, on the CPU
    tokenizer: object
    name: str  # the model's readable name
    stops: list[int]  # end-of-sequence ids
    bytes_read: int  # weight bytes this rank read (its slices, or the whole model on fallback)


def load_rank_part(request: GenerateRequest, rank: int, world_size: int) -> RankPart:
    """Rank `rank`'s shard of request.spec for world_size ranks.

    A local folder (or `default`) with safetensors weights: only this rank's slices are read
    (safetensors_reader + load_shard), after load_model's checks (config.json, no pickled-only
    weights, a cqil-written folder's manifest). Any other spec (a .gguf file, a hub id,
    pickled weights allowed): the whole model is loaded and sliced (shard_from_model).
    """
    from ..inputs.models import (
        check_model_folder,
        folder_model_name,
        load_tokenizer,
        local_model_folder,
        torch_dtype,
    )
    from ..runtime.distributed_cqil import load_shard, safetensors_reader

    folder = local_model_folder(request.spec)
    if folder is None or not any(folder.glob("*.safetensors")):
        return _load_rank_part_whole(request, rank, world_size)
    raw = check_model_folder(folder, request.allow_pickle)
    kind = raw.get("model_type")
    _require_rank_model(kind, request.spec)
    config, stops = _folder_config_and_stops(folder, kind, request.trust_remote_code)
    layout = _plan(config, world_size, request.spec)
    read = safetensors_reader(folder)
    counted = [0]

    def read_counted(sl):  # the slice's own bytes: what this rank reads from the files
        t = read(sl)
        counted[0] += t.numel() * t.element_size()
        return t

    try:
        shard = load_shard(config, layout, rank, read_counted, "cpu", torch_dtype(request.dtype))
    except ValueError as exc:  # a tensor missing from the files, or of the wrong shape
        raise CqilError(f"{folder}: cannot read this rank's weights ({exc})") from exc
    return RankPart(shard, load_tokenizer(folder, request.trust_remote_code),
                    folder_model_name(request.spec, folder, raw), stops, counted[0])


def _folder_config_and_stops(folder: Path, kind: str, trust_remote_code: bool):
    """(CqilConfig, stop ids) from the folder's config files, without its weights. A plain
    Llama-family folder becomes every layer its own step; its tensor names are the ones a
    converted checkpoint uses, so the same reader serves both."""
    from transformers import AutoConfig, GenerationConfig

    from ..runtime.configuration_cqil import CqilConfig

    try:
        if kind == "cqil":
            config = CqilConfig.from_pretrained(folder)
        else:
            config = CqilConfig.from_base_config(
                AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code), None)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise CqilError(f"{folder}: cannot read its config ({line})") from exc
    generation = None
    if (folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(folder)
    return config, eos_ids(generation, config)


def _load_rank_part_whole(request: GenerateRequest, rank: int, world_size: int) -> RankPart:
    from ..inputs.models import load_model
    from ..runtime.checkpoint import build_cqil_model
    from ..runtime.distributed_cqil import shard_from_model

    loaded = load_model(request.spec, device="cpu", dtype=request.dtype,
                        trust_remote_code=request.trust_remote_code,
                        allow_pickle=request.allow_pickle)
    _require_rank_model(loaded.model_type, request.spec)
    model, stops = loaded.model, stop_ids(loaded.model)
    whole_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
    if loaded.model_type != "cqil":
        model = build_cqil_model(model, None, 0)  # every layer its own step
    layout = _plan(model.config, world_size, request.spec)
    return RankPart(shard_from_model(model, layout, rank, "cpu"), loaded.tokenizer, loaded.name,
                    stops, whole_bytes)


def _plan(config, world_size: int, spec: str):
    from ..runtime.distributed_cqil import plan_layout

    try:
        return plan_layout(config, world_size)
    except ValueError as exc:
        raise CqilError(f"{spec}: {exc}") from exc


def _gather_ints(value: int, world_size: int, device: torch.device) -> list[int]:
    """Every rank's value, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist

    mine = torch.tensor([value], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]


def _fail_after_prefill(forward, rank: int):
    """forward itself, unless a test set FAIL_AFTER_PREFILL_ENV to this rank: then the process
    exits abruptly (os._exit(1), as a crash would) right after its first forward call."""
    target = os.environ.get(FAIL_AFTER_PREFILL_ENV)
    if target is None or int(target) != rank:
        return forward

    def forward_then_die(*args, **kwargs):
        out = forward(*args, **kwargs)
        os._exit(1)
        return out

    return forward_then_die
