"""`cqil bench --ranks W`: decode latency of every model on W ranks of cqil's distributed
engine, with each rank's weight bytes and peak memory (docs/bench.md, "On W ranks").

Each model runs in its own launch of W local processes (core/launch.py), one after another, so
that each rank's peak resident memory is that model's alone. Every rank reads only its slices
(inputs/ranks.py: load_rank_part), runs `warmup` untimed generations of the same prompt, then
`repeats` timed ones; every forward call is timed (the first of a generation is the prefill,
each later one a decode step). A plain checkpoint of a family cqil converts runs as the original under
tensor parallelism over all W ranks: the baseline a user of W devices compares with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..core.devices import CallTimer, peak_rss_bytes
from ..core.launch import COLLECTIVE_TIMEOUT_S, launch_local
from ..inputs.ranks import gather_ints, load_rank_part
from .memory import MB
from .statistics import ratio, summarize


@dataclass
class RankBenchRequest:
    """What every rank needs to time one model (picklable: it crosses processes)."""

    spec: str
    prompt: list[list[int]]  # [B, T] token ids, the same on every rank
    new_tokens: int
    warmup: int
    repeats: int
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (NCCL)
    dtype: str = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    threads: int | None = None  # torch threads per rank (default: the cores / local ranks)
    vocab_parallel: bool = True  # False: embedding and lm_head replicated on every rank


def bench_on_ranks(specs: list[str], world_size: int, prompt: torch.Tensor, new_tokens: int,
                   warmup: int, repeats: int, device: str = "cpu", dtype: str = "float32",
                   trust_remote_code: bool = False, allow_pickle: bool = False,
                   on_model=lambda spec: None, threads: int | None = None,
                   vocab_parallel: bool = True) -> dict:
    """The report's `distributed` object: every spec timed on world_size ranks; rows in the
    order given, each with its decode ratio to the first (the baseline)."""
    rows = []
    for spec in specs:
        on_model(spec)
        request = RankBenchRequest(spec, prompt.tolist(), new_tokens, warmup, repeats, device,
                                   dtype, trust_remote_code, allow_pickle, threads,
                                   vocab_parallel)
        rows.append(launch_local(bench_rank, request, world_size, "cqil-bench"))
    first = rows[0]["decode_ms_per_token"]["p50"]
    for row in rows:
        row["decode_ratio_to_baseline"] = ratio(row["decode_ms_per_token"]["p50"], first)
    return {"world_size": world_size, "device": device, "dtype": dtype,
            "batch": int(prompt.shape[0]), "prompt_tokens": int(prompt.shape[1]),
            "new_tokens": new_tokens, "warmup": warmup, "repeats": repeats, "rows": rows}


def bench_rank(request: RankBenchRequest) -> dict | None:
    """One rank of bench_on_ranks: rank 0 returns the model's row, the others None."""
    import torch.distributed as dist

    from ..runtime.distributed_cqil import DistributedCqil, init_distributed

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ["WORLD_SIZE"])
    threads = request.threads or max(1, (os.cpu_count() or 1) // int(
        os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if request.device == "cpu":
        torch.set_num_threads(threads)
    part = load_rank_part(request.spec, rank, world_size, request.dtype,
                          request.trust_remote_code, request.allow_pickle, request.vocab_parallel)
    rank, world_size, device = init_distributed(request.device, COLLECTIVE_TIMEOUT_S)
    try:
        engine = DistributedCqil(part.shard.to(device))
        timer = CallTimer(engine.forward, device)
        engine.forward = timer
        ids = torch.tensor(request.prompt, dtype=torch.long)
        for _ in range(request.warmup):
            engine.generate(ids, max_new_tokens=request.new_tokens)
        prefill, decode = [], []
        for _ in range(request.repeats):
            timer.durations.clear()
            engine.generate(ids, max_new_tokens=request.new_tokens)
            prefill.append(timer.durations[0])
            decode.extend(timer.durations[1:])
        read = gather_ints(part.bytes_read, world_size, device)
        peaks = gather_ints(peak_rss_bytes(), world_size, device)
        if rank != 0:
            return None
        config = part.shard.config
        groups = [list(g) for g in config.groups]
        return {
            "model": request.spec, "name": part.name, "engine": "cqil-distributed",
            "num_layers": int(config.num_hidden_layers),
            "num_steps": len(groups) - len(config.skip_layers or []),
            "groups": [g for g in groups if len(g) > 1],
            "threads_per_rank": threads, "vocab_parallel": request.vocab_parallel,
            "prefill_ms": summarize([1000.0 * s for s in prefill]),
            "decode_ms_per_token": summarize([1000.0 * s for s in decode]),
            "model_weight_bytes": part.model_bytes,
            "ranks": [{"rank": r, "weight_bytes": b, "weight_fraction": b / part.model_bytes,
                       "peak_rss_mb": m / MB}
                      for r, (b, m) in enumerate(zip(read, peaks, strict=True))],
        }
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["RankBenchRequest", "bench_on_ranks", "bench_rank"]
