"""The alpha-beta model's inputs, measured on W local ranks of the distributed engine.

measure_parallel_model(config, W) starts W local processes (core/launch.py), each of which
measures, concurrently with the others (so that they share the cores and the memory bandwidth
as a real run does), with its own threads (the machine's cores / W):
  - the collectives the engine calls (runtime/distributed_cqil.py: Collectives, the same code):
    all-reduce over W and over every lane size between, all-gather over W, each at several
    message sizes from one token's activation up to one rank's share of the logits, back to
    back; alpha and beta fitted per (kind, n) (search/parallel_latency.py: CollectiveCost.fit);
  - the head: final norm and this rank's rows of lm_head; the embedding lookup; the per-forward
    overhead outside the layers (RoPE tables, mask);
  - compute per step at every lane size t (t = W for a single layer, W/P for a member of a group
    of P), timed in the running engine: random weights of the model's shapes in groups of
    P = W/t at two depths, the slope of the decode time per token between them, less the
    step's collectives as fitted. Timing a layer slice alone, back to back, underestimated a
    grouped step by 40 % on a 2-core CPU (docs/performance.md, "Several ranks"): in the run the
    ranks share the cores with gloo's threads and wait for each other between collectives. The
    isolated times are kept in the model's `source` for comparison.
The weights are random (time depends on shapes and dtype only), so no rank reads the model.

The slices themselves, for any process (benchmarks/layer_compute.py times them on one device):
layer_slice_step (one rank's slice of a layer on a lane of t ranks, with its KV cache),
head_slice_step (final norm + this rank's lm_head rows), embed_slice_step, each a SliceStep
cycling copies of its weights so that no timed call finds them in a cache; timed_seconds (the
median after warm-up, device synchronised).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.devices import synchronize
from ..core.launch import COLLECTIVE_TIMEOUT_S, launch_local
from .parallel_latency import (
    ALL_GATHER,
    ALL_REDUCE,
    CollectiveCost,
    ComputeCost,
    ParallelLatencyModel,
    collectives_by_key,
    divisors,
)

CACHE_FLUSH_BYTES = 256 * 2**20  # run layer copies until this many weight bytes were read


@dataclass
class ProbeRequest:
    """What every rank needs (picklable: it crosses processes)."""

    config: dict  # the converted (or plain, every layer its own step) model's CqilConfig.to_dict()
    world_size: int
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (NCCL)
    dtype: str = "float32"
    context_tokens: int = 160  # KV positions while timing a decode token
    repeats: int = 30
    batch: int = 1
    bypass_distance: int = 1  # D of the groups timed in the running engine


def measure_parallel_model(config, world_size: int, device: str = "cpu",
                           dtype: str = "float32", context_tokens: int = 160,
                           repeats: int = 30, bypass_distance: int = 1) -> ParallelLatencyModel:
    """The ParallelLatencyModel of `config`'s shapes on `world_size` local ranks (measured)."""
    request = ProbeRequest(config.to_dict(), world_size, device, dtype, context_tokens, repeats,
                           bypass_distance=bypass_distance)
    return ParallelLatencyModel.from_json(
        launch_local(probe_rank, request, world_size, "cqil-probe"))


def probe_rank(request: ProbeRequest) -> dict | None:
    """One rank of measure_parallel_model: rank 0 returns the model's JSON, the others None."""
    import torch.distributed as dist

    from ..runtime.configuration_cqil import CqilConfig
    from ..runtime.distributed_cqil import Collectives, init_distributed

    W = request.world_size
    if request.device == "cpu":  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(
            os.environ.get("LOCAL_WORLD_SIZE", W))))
    rank, world, device = init_distributed(request.device, COLLECTIVE_TIMEOUT_S)
    try:
        if world != W:
            raise ValueError(f"probe for {W} ranks started on {world}")
        config = CqilConfig.from_dict(request.config)
        dtype = getattr(torch, request.dtype)
        lanes = [t for t in divisors(W) if t <= config.num_key_value_heads]
        collectives = Collectives(rank, W, lanes)
        element = torch.empty((), dtype=dtype).element_size()
        with torch.no_grad():
            isolated = {t: _slowest(_layer_seconds(config, W, t, rank, request, device, dtype),
                                    collectives) for t in lanes}
            head_s, embed_s, overhead_s = (
                _slowest(s, collectives)
                for s in _outside_seconds(config, W, rank, request, device, dtype))
            costs = collectives_by_key(
                _collective_costs(config, W, lanes, collectives, request, device, dtype))
            model = ParallelLatencyModel(config.hidden_size, config.vocab_size, element,
                                         ComputeCost(isolated, {W: head_s}, embed_s, overhead_s),
                                         costs, post_norms=bool(config.post_norms))
            in_run = _compute_in_the_engine(config, W, rank, lanes, model, collectives, request,
                                            device, dtype)
        if rank != 0:
            return None
        where = "cuda" if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
        model.compute = ComputeCost(in_run, {W: head_s}, embed_s, overhead_s)
        model.source = (f"measured on {W} local ranks ({where} each, {request.dtype}); "
                        f"layer compute in the running engine (isolated slices: "
                        + ", ".join(f"t={t}: {1e3 * v:.3f} ms" for t, v in isolated.items()) + ")")
        return model.to_json()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _slowest(seconds: float, collectives) -> float:
    """The largest of every rank's value (ranks run in lockstep: the slowest sets the pace)."""
    every = collectives.all_gather(torch.tensor([seconds], dtype=torch.float64))
    return float(every.max())


def timed_seconds(fn, repeats: int, device, barrier=None, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` calls, every rank starting
    each call together (barrier; None: a single process)."""
    barrier = barrier or (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        barrier()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _barrier():
    import torch.distributed as dist

    return dist.barrier if dist.is_initialized() and dist.get_world_size() > 1 else (lambda: None)


def _layer_seconds(config, W: int, t: int, rank: int, request: ProbeRequest, device,
                   dtype) -> float:
    """Seconds of one decode token through this rank's slice of a layer on a lane of t ranks."""
    step = layer_slice_step(config, t, world_size=W, rank=rank, device=device, dtype=dtype,
                            context_tokens=request.context_tokens, batch=request.batch)
    return timed_seconds(step.run, request.repeats, device, _barrier()) / step.copies


@dataclass
class SliceStep:
    """One decode token through one rank's slice of the model, timed as `run()`: it runs each
    of `copies` copies of the slice once (each copy its own weights and KV cache), so that a
    copy's weights have left the caches when it runs again (CACHE_FLUSH_BYTES); a token costs
    the time of `run()` / copies. The inputs are fixed tensors and the work holds no host sync,
    so `run` can be captured as a CUDA graph."""

    run: Callable[[], None]
    copies: int
    weight_bytes: int  # one copy's parameters
    cache_bytes: int = 0  # the KV cache one copy reads per token

    @property
    def bytes_per_token(self) -> int:
        return self.weight_bytes + self.cache_bytes


def _copies(nbytes: int) -> int:
    """Copies of a slice of `nbytes` that together read at least CACHE_FLUSH_BYTES (1 to 16)."""
    return max(1, min(16, math.ceil(CACHE_FLUSH_BYTES / max(1, nbytes))))


def _nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def layer_slice_step(config, lane_size: int, *, world_size: int | None = None, rank: int = 0,
                     device="cpu", dtype=torch.float32, context_tokens: int = 160,
                     batch: int = 1) -> SliceStep:
    """This rank's slice of a layer on a lane of `lane_size` ranks, exactly as the distributed
    engine runs it (runtime/distributed_cqil.py, DistributedCqil._step without its
    collectives): q/k/v projections and RoPE, the KV cache of `context_tokens` positions
    (random), attention and o_proj, the MLP. Random weights of config's shapes (time depends
    on shapes and dtype only), a member of a group of world_size / lane_size layers (default
    world_size = lane_size: a single layer); rank 0 holds the longest runs of heads and columns
    when they do not divide evenly (the slowest rank)."""
    from ..runtime.distributed_cqil import RankKVCache
    from ..runtime.edges_cqil import make_rotaries, masks_by_type
    from ..runtime.modeling_cqil import CqilDecoderLayer
    from ..runtime.sharding_cqil import slice_config

    W = world_size or lane_size
    sl = _layout(config, W, W // lane_size).slice(rank, 0)
    sliced = slice_config(config, sl)
    torch.manual_seed(rank)

    def new_layer():
        with torch.device(device):
            return CqilDecoderLayer(sliced, sl.layer, sl.member, sl.group_size).to(dtype).eval()

    copies = [new_layer()]
    weight_bytes = _nbytes(copies[0])
    copies += [new_layer() for _ in range(_copies(weight_bytes) - 1)]
    B, T, past = batch, 1, context_tokens
    x = torch.randn(B, T, config.hidden_size, device=device, dtype=dtype)
    kind = config.layer_types[sl.layer]  # the RoPE and mask of this layer's type, as the engine
    cos, sin = make_rotaries(config, device)[kind](x, torch.full((1, T), past, device=device))
    mask, is_causal = masks_by_type(config, None, B, T, past, device)[kind]
    caches = []
    g, hd = len(sl.kv_heads), config.head_dim
    for step in range(len(copies)):
        cache = RankKVCache(past + T)
        cache.update(torch.randn(B, g, past, hd, device=device, dtype=dtype),
                     torch.randn(B, g, past, hd, device=device, dtype=dtype), step)
        cache.length = past  # every run writes position `past` and reads past + 1 positions
        caches.append(cache)

    def run():
        for step, (layer, cache) in enumerate(zip(copies, caches, strict=True)):
            attn = layer.self_attn
            q, k, v = attn.project(layer.attn_input(x), cos, sin)
            k, v = cache.update(k, v, step)
            a = attn.attend(q, k, v, mask, is_causal)
            h = x + a
            _ = h + layer.mlp(layer.post_attention_layernorm(h))

    element = torch.empty((), dtype=dtype).element_size()
    return SliceStep(run, len(copies), weight_bytes, 2 * B * g * (past + T) * hd * element)


def head_slice_step(config, world_size: int, *, rank: int = 0, device="cpu",
                    dtype=torch.float32, batch: int = 1) -> SliceStep:
    """The head of one rank on W ranks, as DistributedCqil.logits runs it before its gather:
    the final norm and this rank's ⌈V/W⌉ rows of the lm_head (random weights), in copies."""
    from ..runtime.families_cqil import make_norm

    rows = len(_layout(config, world_size, 1).vocab_rows(rank))
    d = config.hidden_size

    def new_head():
        with torch.device(device):
            return torch.nn.Sequential(make_norm(config, d),
                                       torch.nn.Linear(d, rows, bias=False)).to(dtype).eval()

    copies = [new_head()]
    weight_bytes = _nbytes(copies[0])
    copies += [new_head() for _ in range(_copies(weight_bytes) - 1)]
    x = torch.randn(batch, 1, d, device=device, dtype=dtype)

    def run():
        for head in copies:
            head(x)

    return SliceStep(run, len(copies), weight_bytes)


def embed_slice_step(config, world_size: int, *, rank: int = 0, device="cpu",
                     dtype=torch.float32, batch: int = 1) -> SliceStep:
    """The embedding lookup of one rank on W ranks (DistributedCqil.embed before its
    all-reduce): its ⌈V/W⌉ rows, ids outside them zeroed. It reads B rows only: one copy."""
    rows = len(_layout(config, world_size, 1).vocab_rows(rank))
    with torch.device(device):
        embed = torch.nn.Embedding(rows, config.hidden_size).to(dtype)
    ids = torch.randint(0, rows, (batch, 1), device=device)

    def run():
        embed(ids).masked_fill(ids[..., None] < 0, 0.0)

    return SliceStep(run, 1, batch * config.hidden_size * embed.weight.element_size())


def _layout(config, W: int, group_size: int):
    """W ranks running one step of `group_size` layers (lanes of W / group_size ranks)."""
    from ..runtime.sharding_cqil import DistributedLayout

    return DistributedLayout(W, (tuple(range(group_size)),), config.num_attention_heads,
                             config.num_key_value_heads, config.intermediate_size,
                             config.hidden_size, config.head_dim, config.vocab_size, W > 1)


def probe_depths(num_layers: int, m: int) -> tuple[int, int]:
    """(short, deep) layer counts of the in-engine timing: deep the model's depth, short a
    third of it, both multiples of m (every group size), at least m and 3m."""
    deep = max(3 * m, -(-num_layers // m) * m)
    return max(m, -(-deep // (3 * m)) * m), deep


def _compute_in_the_engine(config, W: int, rank: int, lanes: list[int], model, collectives,
                           request, device, dtype) -> dict[int, float]:
    """Seconds of compute per step at each lane size t, timed in the running engine.

    For each group size s = W/t, the distributed engine runs random weights of the model's
    shapes in two depths (probe_depths: the model's own depth and a third of it, multiples of
    every s, at least m and 3m; depths of a few layers let a rank's weights sit in the CPU's
    caches and underestimated the real model by 13-21 %), all in groups of s with
    bypass distance D; the slope of the per-token decode time between the depths is one step's
    cost with everything the engine does around it (collectives, waits for the other ranks,
    their threads on shared cores), the embedding and head cancel out. The step's collectives,
    as the alpha-beta fit predicts them, are taken off, so that the model adds them back the
    same way for any grouping. The median of `repeats // 10` (at least 3) rounds counts."""
    sizes = sorted({W // t for t in lanes})
    depths = probe_depths(config.num_hidden_layers, math.lcm(*sizes))
    per_step: dict[int, float] = {}
    rounds = max(3, request.repeats // 10)
    for s in sizes:
        engines = [_random_engine(config, W, rank, s, depth, request, device, dtype)
                   for depth in depths]
        slopes = []
        for _ in range(rounds):
            short, deep = (_decode_seconds(e, config, request, device) for e in engines)
            slopes.append((deep - short) / ((depths[1] - depths[0]) // s))  # s. per step
        per_step[s] = statistics.median(slopes)
        del engines
    out = {}
    for s, seconds in per_step.items():
        calls = model.step_collectives(s, request.bypass_distance, W, request.batch)
        out[W // s] = _slowest(max(seconds - sum(model.collective_s(c) for c in calls), 0.0),
                               _collectives_of(model))
    return out


def _collectives_of(model):
    import torch.distributed as dist

    from ..runtime.distributed_cqil import Collectives

    W = dist.get_world_size() if dist.is_initialized() else 1
    return Collectives(dist.get_rank() if W > 1 else 0, W)


def _random_engine(config, W: int, rank: int, group_size: int, depth: int, request, device,
                   dtype):
    """This rank's DistributedCqil of `depth` layers of the model's shapes in groups of
    `group_size`, random weights (normal, std 0.02; norms, gamma and biases ones)."""
    import copy

    from ..runtime.distributed_cqil import DistributedCqil
    from ..runtime.sharding_cqil import CqilShard, plan_layout

    c = copy.deepcopy(config)
    c.num_hidden_layers = depth
    c.layer_types = [config.layer_types[0]] * depth
    c.groups = [list(range(i, i + group_size)) for i in range(0, depth, group_size)]
    c.bypass_distance, c.skip_layers = request.bypass_distance, []
    layout = plan_layout(c, W)
    with torch.device("meta"):
        shard = CqilShard(c, layout, rank)
    generator = torch.Generator().manual_seed(rank)

    def random(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():  # a quantized folder's codes (int8, or int4 packed in uint8)
            low, high = (-127, 128) if t.dtype == torch.int8 else (0, 256)
            return torch.randint(low, high, t.shape, generator=generator, dtype=t.dtype).to(device)
        return (torch.randn(t.shape, generator=generator) * 0.02 if t.dim() > 1
                else torch.ones(t.shape)).to(device=device, dtype=dtype)

    state = {name: random(t) for name, t in shard.state_dict().items()}
    shard.load_state_dict(state, strict=False, assign=True)
    if c.tie_word_embeddings and isinstance(shard.lm_head, torch.nn.Linear):
        shard.lm_head.weight = shard.embed_tokens.weight
    return DistributedCqil(shard.eval().requires_grad_(False))


def _decode_seconds(engine, config, request, device) -> float:
    """Median per-token decode seconds of one generation after a prompt of context_tokens."""
    from ..core.devices import CallTimer

    prompt = torch.randint(0, config.vocab_size, (request.batch, request.context_tokens),
                           generator=torch.Generator().manual_seed(1))
    timer = CallTimer(engine.forward, device)
    engine.forward = timer
    try:
        engine.generate(prompt, max_new_tokens=17)
    finally:
        engine.forward = timer.fn
    return statistics.median(timer.durations[1:])


def _outside_seconds(config, W: int, rank: int, request: ProbeRequest, device,
                     dtype) -> tuple[float, float, float]:
    """(head, embedding, per-forward overhead) seconds of one decode token on this rank."""
    from ..runtime.edges_cqil import make_rotaries, masks_by_type, rope_by_type

    B, d, past = request.batch, config.hidden_size, request.context_tokens
    barrier = _barrier()
    seconds = []
    for make in (head_slice_step, embed_slice_step):
        step = make(config, W, rank=rank, device=device, dtype=dtype, batch=B)
        seconds.append(timed_seconds(step.run, request.repeats, device, barrier) / step.copies)
    x = torch.randn(B, 1, d, device=device, dtype=dtype)
    rotaries = make_rotaries(config, device)
    mask = torch.ones(B, past + 1, dtype=torch.long, device=device)

    def overhead():  # what DistributedCqil.forward does per token outside the steps
        rope_by_type(rotaries, x, torch.full((B, 1), past, device=device))
        masks_by_type(config, mask, B, 1, past, device)

    return seconds[0], seconds[1], timed_seconds(overhead, request.repeats, device, barrier)


def _collective_costs(config, W: int, lanes: list[int], collectives, request: ProbeRequest,
                      device, dtype) -> list[CollectiveCost]:
    """alpha and beta of every collective the engine calls on W ranks, fitted from back-to-back
    calls at message sizes from one token's activation [B, 1, d] to one rank's logits."""
    if W == 1:
        return []
    element = torch.empty((), dtype=dtype).element_size()
    activation = request.batch * config.hidden_size
    rows = -(-config.vocab_size // W) * request.batch
    sizes = sorted({activation, 4 * activation, 16 * activation, rows})
    barrier, calls_per_timing = _barrier(), 10
    kinds = [(ALL_REDUCE, W), (ALL_GATHER, W)] + [(ALL_REDUCE, t) for t in lanes if 1 < t < W]
    costs = []
    for kind, n in kinds:
        samples = []
        for numel in sizes:
            buffer = torch.randn(1, numel, device=device, dtype=dtype)
            if kind == ALL_REDUCE:
                def call(b=buffer, n=n):
                    collectives.all_reduce(b.clone(), n)
            else:
                def call(b=buffer):
                    collectives.all_gather(b)

            def many(call=call):
                for _ in range(calls_per_timing):
                    call()

            seconds = timed_seconds(many, max(5, request.repeats // 3), device, barrier)
            samples.append((numel * element, seconds / calls_per_timing))
        costs.append(CollectiveCost.fit(samples, kind=kind, n_ranks=n))
    return costs


__all__ = ["ProbeRequest", "measure_parallel_model", "probe_rank", "SliceStep",
           "layer_slice_step", "head_slice_step", "embed_slice_step", "timed_seconds"]
