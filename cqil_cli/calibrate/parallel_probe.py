"""The alpha-beta model's inputs, measured on W local ranks of the distributed engine.

measure_parallel_model(config, W) starts W local processes (core/launch.py), each of which
measures, concurrently with the others (so that they share the cores and the memory bandwidth
as a real run does), with its own threads (the machine's cores / W):
  - the collectives the engine calls (runtime/distributed_cqil.py: Collectives, the same code):
    all-reduce over W and over every lane size between, all-gather over W, each at several
    message sizes from one token's activation up to one rank's share of the logits, back to
    back; alpha and beta fitted per (kind, n) (calibrate/parallel_latency.py: CollectiveCost.fit);
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
"""

from __future__ import annotations

import math
import os
import statistics
import time
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
                                         costs)
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


def _timed(fn, repeats: int, device, barrier) -> float:
    """Median seconds of fn() over `repeats` calls after two warm-up calls, every rank
    starting each call together."""
    for _ in range(2):
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
    from ..runtime.configuration_cqil import SLIDING
    from ..runtime.distributed_cqil import RankKVCache
    from ..runtime.modeling_cqil import CqilDecoderLayer, build_attention_mask
    from ..runtime.sharding_cqil import slice_config

    sl = _layout(config, W, W // t).slice(rank, 0)
    sliced = slice_config(config, sl)
    torch.manual_seed(rank)
    with torch.device(device):
        first = CqilDecoderLayer(sliced, sl.layer, sl.member, sl.group_size).to(dtype).eval()
    layer_bytes = sum(p.numel() * p.element_size() for p in first.parameters())
    copies = [first] + [CqilDecoderLayer(sliced, sl.layer, sl.member, sl.group_size).to(
        device=device, dtype=dtype).eval()
        for _ in range(max(0, min(16, math.ceil(CACHE_FLUSH_BYTES / layer_bytes)) - 1))]
    B, T, past = request.batch, 1, request.context_tokens
    x = torch.randn(B, T, config.hidden_size, device=device, dtype=dtype)
    rotary = _rotary(config, device)
    cos, sin = rotary(x, torch.full((1, T), past, device=device))
    window = config.sliding_window if config.layer_types[0] == SLIDING else None
    mask, is_causal = build_attention_mask(None, B, T, past, window, device)
    caches = []
    for step in range(len(copies)):
        cache = RankKVCache(past + T)
        g, hd = len(sl.kv_heads), config.head_dim
        cache.update(torch.randn(B, g, past, hd, device=device, dtype=dtype),
                     torch.randn(B, g, past, hd, device=device, dtype=dtype), step)
        cache.length = past
        caches.append(cache)

    def run():
        for step, (layer, cache) in enumerate(zip(copies, caches, strict=True)):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
            k, v = cache.update(k, v, step)
            a = attn.attend(q, k, v, mask, is_causal)
            h = x + a
            _ = h + layer.mlp(layer.post_attention_layernorm(h))

    return _timed(run, request.repeats, device, _barrier()) / len(copies)


def _layout(config, W: int, group_size: int):
    """W ranks running one step of `group_size` layers (lanes of W / group_size ranks)."""
    from ..runtime.sharding_cqil import DistributedLayout

    return DistributedLayout(W, (tuple(range(group_size)),), config.num_attention_heads,
                             config.num_key_value_heads, config.intermediate_size,
                             config.hidden_size, config.head_dim, config.vocab_size, W > 1)


def _compute_in_the_engine(config, W: int, rank: int, lanes: list[int], model, collectives,
                           request, device, dtype) -> dict[int, float]:
    """Seconds of compute per step at each lane size t, timed in the running engine.

    For each group size s = W/t, the distributed engine runs random weights of the model's
    shapes in two depths, m and 3m layers (m: a multiple of every s), all in groups of s with
    bypass distance D; the slope of the per-token decode time between the depths is one step's
    cost with everything the engine does around it (collectives, waits for the other ranks,
    their threads on shared cores), the embedding and head cancel out. The step's collectives,
    as the alpha-beta fit predicts them, are taken off, so that the model adds them back the
    same way for any grouping. The median of `repeats // 10` (at least 3) rounds counts."""
    sizes = sorted({W // t for t in lanes})
    m = math.lcm(*sizes)
    per_step: dict[int, float] = {}
    rounds = max(3, request.repeats // 10)
    for s in sizes:
        engines = [_random_engine(config, W, rank, s, depth, request, device, dtype)
                   for depth in (m, 3 * m)]
        slopes = []
        for _ in range(rounds):
            short, deep = (_decode_seconds(e, config, request, device) for e in engines)
            slopes.append((deep - short) / (2 * m // s))  # seconds per step of s layers
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
    state = {name: (torch.randn(t.shape, generator=generator) * 0.02 if t.dim() > 1
                    else torch.ones(t.shape)).to(device=device, dtype=dtype)
             for name, t in shard.state_dict().items()}
    shard.load_state_dict(state, strict=False, assign=True)
    if c.tie_word_embeddings:
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


def _rotary(config, device):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device(device):
        return LlamaRotaryEmbedding(config=config)


def _outside_seconds(config, W: int, rank: int, request: ProbeRequest, device,
                     dtype) -> tuple[float, float, float]:
    """(head, embedding, per-forward overhead) seconds of one decode token on this rank."""
    from ..runtime.configuration_cqil import SLIDING
    from ..runtime.modeling_cqil import CqilRMSNorm, build_attention_mask
    rows = len(_layout(config, W, 1).vocab_rows(rank))
    d, B = config.hidden_size, request.batch
    with torch.device(device):
        norm = CqilRMSNorm(d, eps=config.rms_norm_eps).to(dtype)
        head = torch.nn.Linear(d, rows, bias=False).to(dtype)
        embed = torch.nn.Embedding(rows, d).to(dtype)
    x = torch.randn(B, 1, d, device=device, dtype=dtype)
    ids = torch.randint(0, rows, (B, 1), device=device)
    rotary = _rotary(config, device)
    past = request.context_tokens
    barrier = _barrier()
    head_s = _timed(lambda: head(norm(x)), request.repeats, device, barrier)
    embed_s = _timed(lambda: embed(ids).masked_fill(ids[..., None] < 0, 0.0), request.repeats,
                     device, barrier)
    mask = torch.ones(B, past + 1, dtype=torch.long, device=device)

    def overhead():  # what DistributedCqil.forward does per token outside the steps
        rotary(x, torch.full((B, 1), past, device=device))
        for kind in set(config.layer_types):
            window = config.sliding_window if kind == SLIDING else None
            build_attention_mask(mask, B, 1, past, window, device)

    return head_s, embed_s, _timed(overhead, request.repeats, device, barrier)


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

            seconds = _timed(many, max(5, request.repeats // 3), device, barrier)
            samples.append((numel * element, seconds / calls_per_timing))
        costs.append(CollectiveCost.fit(samples, kind=kind, n_ranks=n))
    return costs


__all__ = ["ProbeRequest", "measure_parallel_model", "probe_rank"]
