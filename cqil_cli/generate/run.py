"""Generation for `cqil generate` (docs/generate.md): on one device, or as one rank of W.

  generate_single(loaded, prompts, n)   one device: cqil's FastGenerator for a converted folder
                                        or a model of a family it runs (runtime/
                                        family_table_cqil.py), transformers' generate() else
  generate_rank(request)                one rank of W (torch.distributed already described in
                                        the environment): load this rank's shard (load_rank_part:
                                        its slices only, from a local safetensors folder),
                                        DistributedCqil.generate; rank 0 returns the document,
                                        the other ranks None

Every engine returns the same tokens for the same greedy run: each prompt's tokens end at its
first end-of-sequence token (included), whatever the engine did after it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..core.devices import CallTimer, peak_rss_bytes, synchronize
from ..core.documents import Schema
from ..core.errors import CqilError
from ..core.launch import COLLECTIVE_TIMEOUT_S
from ..inputs.ranks import gather_ints, load_rank_part, stop_ids

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
        """generate()'s keyword arguments (top_p only when set)."""
        out = dict(do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k,
                   seed=self.seed)
        if self.top_p is not None:
            out["top_p"] = self.top_p
        return out

    def to_json(self) -> dict | None:
        return {**self.kwargs(), "top_p": self.top_p} if self.do_sample else None


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


# ---------------------------------------------------------------------------- one device


def generate_single(loaded, prompts: list[str], new_tokens: int,
                    sampling: Sampling = Sampling()) -> GenerateResult:
    """Continuations of prompts (one left-padded batch) on the model's own device."""
    from ..runtime.family_table_cqil import runs_on

    model, tokenizer = loaded.model, loaded.tokenizer
    ids, mask = encode_prompts(tokenizer, prompts)
    stops = stop_ids(model)
    pad = pad_id(tokenizer, stops)
    device = next(model.parameters()).device
    start = time.perf_counter()
    if runs_on(model.config, "fastgen"):
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
    part = load_rank_part(request.spec, rank, world_size, request.dtype,
                          request.trust_remote_code, request.allow_pickle)
    rank, world_size, device = init_distributed(request.device, COLLECTIVE_TIMEOUT_S)
    try:
        engine = DistributedCqil(part.shard.to(device))
        read_bytes = gather_ints(part.bytes_read, world_size, device)
        tokenizer, stops = part.tokenizer, part.stops
        ids, mask = encode_prompts(tokenizer, request.prompts)
        timer = CallTimer(engine.forward, device)
        engine.forward = _fail_after_prefill(timer, rank)
        start = time.perf_counter()
        out = engine.generate(ids, mask, max_new_tokens=request.new_tokens,
                              eos_token_id=stops or None, pad_token_id=pad_id(tokenizer, stops),
                              **request.sampling.kwargs())
        total_s = time.perf_counter() - start
        peaks = gather_ints(peak_rss_bytes(), world_size, device)
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
