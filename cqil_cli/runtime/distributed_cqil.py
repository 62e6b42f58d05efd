"""The distributed engine: a converted model on W ranks of torch.distributed (docs/runtime.md,
"Distributed engine").

Self-contained like its siblings (torch, transformers, the standard library, and the sibling
runtime files imported relatively), so that it travels with a checkpoint
(checkpoint.RUNTIME_FILES). It computes what modeling_cqil.reference_step defines (the method:
docs/method.md), with the work of every step spread over the W ranks as sharding_cqil.py lays it
out. Per generated token (batch B, hidden d):

  embedding      vocab-parallel: each rank looks up the ids in its rows (zeros elsewhere);
                 one all-reduce over W ranks of [B, T, d] gives every rank the embeddings
                 (Gemma: then times sqrt(d), as on one device).
  single layer   tensor-parallel over all W ranks: a = Σ_r a_r (all-reduce 1), then
                 m = Σ_r m_r (all-reduce 2); Gemma's post-norms act on these full sums.
  group of P     member j on lane j (W/P ranks, tensor-parallel within the lane). Each rank's
                 attention gives a_j's part of its lane (the whole a_j on a lane of one). Then,
                 before the MLPs:
                   D > 0   one all-gather of the W attention parts over all ranks; every rank sums
                           the parts of each lane, so it holds every full a_k (its own a_j and the
                           bypass inputs a_{j-D..j-1});
                   D = 0   nothing on lanes of one rank; on longer lanes one all-reduce inside the
                           lane gives its members the full a_j;
                 and one all-reduce over all W ranks of the parts of Σ_j γ_j ⊙ (a_j + m_j) ends the
                 group: y = x + that sum. At most two collectives per group, where tensor
                 parallelism of the same P layers pays 2P all-reduces.
                 Families with post-norms (Gemma: a_j = Na_j(o_j), m_j = Nf_j(f_j) with o_j, f_j
                 the attention and MLP outputs) cannot sum a lane's partial o_j or f_j after
                 the norm, so on lanes of t > 1 ranks each is reduced inside the lane before
                 its norm (two more lane all-reduces per group; lanes of one rank, P = W, pay
                 nothing more): _post_norm_group.
  final norm, lm_head   each rank computes the logits of its vocabulary rows (Gemma's final
                 soft-cap applied to them); one all-gather
                 gives every rank the full logits [B, T, V], bit-identical on every rank, so
                 every rank picks (greedy) or draws (sampling, the same seeded generator) the
                 same token without a broadcast.
With a replicated embedding and lm_head (plan_layout(..., vocab_parallel=False)) the first and
last collectives are not needed; every rank then computes the whole head.

Collectives (class Collectives): on NCCL, torch's all_reduce and all_gather_into_tensor. On gloo
(CPU), a small all-reduce is slower than an all-gather (measured on this project's 2-core CPU,
W = 2, 576 floats: all_reduce 3.0 ms median, all_gather 0.48 ms, a send/receive exchange
0.34 ms; docs/performance.md), so an all-reduce runs as an all-gather (an exchange between two
ranks) followed by a sum of the parts in rank order: every rank adds the same parts in the same
order, so all ranks hold bit-identical sums. Lane process groups are created once
(dist.new_group, collective). Why not DeviceMesh / functional collectives: this engine runs
eagerly, where in-place collectives into preallocated buffers avoid an allocation per call, and
it needs only the lane groups; a torch.compile / CUDA-graph path may move to functional
collectives.

The KV cache is per rank (RankKVCache): one entry per step with this rank's kv heads of its
layer in that step, preallocated for the whole generation (max_length) and written in place.

Quantized folders (config weights, quant_cqil.py): each rank holds its slices of the codes and
scales (sharding_cqil.py), and every quantized matmul runs the fast path (QuantKernel: torch's
CPU int8 / int4 kernels, activations rounded to bf16), as the single-process fused engine does.

Unified Layer Skipping (config skip_layers) follows modeling_cqil: a forward on an empty cache
runs every step, later forwards pass the skipped layers over.

  init_distributed()              torch.distributed from torchrun's environment (gloo / NCCL)
  Collectives                     the sums and gathers above, over the world or one lane
  RankKVCache                     one rank's KV cache
  sampling_scores, next_tokens    greedy or sampled tokens (temperature, top-k, top-p)
  DistributedCqil                 one rank's forward and generate
The layout and shards (plan_layout, CqilShard, load_shard, load_rank, ...) live in
sharding_cqil.py and are re-exported here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .edges_cqil import (  # noqa: F401  (sampling: importable from here too)
    head_logits,
    make_rotaries,
    masks_by_type,
    next_tokens,
    rope_by_type,
    sampling_scores,
    scale_embeddings,
)
from .quant_cqil import quantized_linears
from .sharding_cqil import (
    CqilShard,
    DistributedLayout,
    LayerSlice,
    TensorSlice,
    fitting_world_sizes,
    load_rank,
    load_shard,
    plan_layout,
    safetensors_reader,
    shard_from_model,
    shard_nbytes,
)

# ----------------------------------------------------------------------------- processes


def init_distributed(device: str | None = None,
                     timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Join the process group torchrun (or the caller) described in the environment:
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, and LOCAL_RANK for the GPU.

    device: "cuda" (NCCL, cuda:LOCAL_RANK) or "cpu" (gloo); default cuda when available.
    Returns (rank, world size, this rank's device).
    """
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if k not in os.environ]
    if missing and not dist.is_initialized():
        raise ValueError(f"the distributed environment lacks {', '.join(missing)}: start the ranks "
                         "with torchrun, or set these variables")
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), dev


class Collectives:
    """Sums and gathers over all W ranks or over this rank's lane of t ranks (see the module
    docstring for why gloo's all-reduce runs as a gather and a sum).

    Construct it on every rank in the same order: it creates every lane's process group (a
    collective call) for each lane size in `lane_sizes`. With W = 1 every call returns its input.
    """

    def __init__(self, rank: int, world_size: int, lane_sizes=(), native: bool | None = None):
        self.rank, self.world_size = rank, world_size
        self.native = native if native is not None else (
            world_size > 1 and dist.get_backend() == "nccl")
        # lane size -> (this rank's group, its ranks); the world's group is None (the default).
        self._lanes: dict[int, tuple[object, tuple[int, ...]]] = {
            world_size: (None, tuple(range(world_size)))}
        for t in sorted(set(lane_sizes)):
            if 1 < t < world_size:
                for start in range(0, world_size, t):
                    ranks = tuple(range(start, start + t))
                    group = dist.new_group(list(ranks))  # every rank creates every group
                    if rank in ranks:
                        self._lanes[t] = (group, ranks)
        # all_gather_into_tensor's newer name, where torch has it (the old one warns)
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def all_gather(self, t: torch.Tensor, lane_size: int | None = None) -> torch.Tensor:
        """t [s0, ...] of each rank of the world (or of this rank's lane) -> [n, s0, ...], in rank
        order."""
        n = lane_size or self.world_size
        if n == 1:
            return t[None]
        group, ranks = self._lanes[n]
        t = t.contiguous()
        out = t.new_empty((n, *t.shape))
        if n == 2 and not self.native:  # a pair: one send and one receive each
            me = ranks.index(self.rank)
            out[me].copy_(t)
            other = ranks[1 - me]
            ops = [dist.P2POp(dist.isend, t, other), dist.P2POp(dist.irecv, out[1 - me], other)]
            for request in dist.batch_isend_irecv(ops):
                request.wait()
            return out
        # gloo takes the concatenated form [n*s0, ...], not the stacked one
        self._gather(out.view(n * t.shape[0], *t.shape[1:]), t, group=group)
        return out

    def all_reduce(self, t: torch.Tensor, lane_size: int | None = None) -> torch.Tensor:
        """Σ over the ranks of the world (or of this rank's lane) of t; the same tensor on every
        rank (NCCL: in place; gloo: a new tensor, the parts added in rank order)."""
        n = lane_size or self.world_size
        if n == 1:
            return t
        if self.native:
            dist.all_reduce(t, group=self._lanes[n][0])
            return t
        return self.all_gather(t, n).sum(0)


class RankKVCache:
    """One rank's KV cache: per step, k and v [B, this rank's kv heads, S, hd].

    With max_length, each step's entry is allocated once at [B, g, max_length, hd] and written
    in place (the static fast path); without, entries grow by concatenation.
    """

    def __init__(self, max_length: int | None = None) -> None:
        self.max_length = max_length
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.length = 0  # positions every forward so far has fed (the next query's cache position)

    def update(self, k: torch.Tensor, v: torch.Tensor,
               step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v [B, g, T, hd] at positions length..length+T of step `step`; return the
        entry so far [B, g, length + T, hd]."""
        end = self.length + k.shape[2]
        if self.max_length is None:
            if step in self.keys:
                k = torch.cat([self.keys[step], k], dim=2)
                v = torch.cat([self.values[step], v], dim=2)
            self.keys[step], self.values[step] = k, v
            return k, v
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions; {end} needed")
        if step not in self.keys:
            B, g, _, hd = k.shape
            self.keys[step] = k.new_empty(B, g, self.max_length, hd)
            self.values[step] = v.new_empty(B, g, self.max_length, hd)
        self.keys[step][:, :, self.length:end] = k
        self.values[step][:, :, self.length:end] = v
        return self.keys[step][:, :, :end], self.values[step][:, :, :end]


@dataclass
class DistributedGeneration:
    tokens: torch.Tensor  # [B, n] new tokens (pad after a sequence's eos)
    logits: list[torch.Tensor]  # output_logits only: prefill [B, T, V], then [B, 1, V] per token


# ----------------------------------------------------------------------------- engine


class DistributedCqil:
    """One rank of the distributed engine: its shard, its collectives, its forward.

    Construct it on every rank, in the same order (it creates the lane process groups
    collectively). Every rank must run the same forward calls with the same inputs.
    """

    def __init__(self, shard: CqilShard):
        self.shard, self.config, self.layout = shard, shard.config, shard.layout
        self.rank, self.world_size = shard.rank, shard.layout.world_size
        self.device = shard.embed_tokens.weight.device
        for linear in quantized_linears(shard):  # the layers' code calls the modules: the fast path
            linear.use_kernel = True
        joined = dist.is_initialized() and dist.get_world_size() == self.world_size
        if self.world_size > 1 and not joined:
            raise ValueError(f"the layout is for {self.world_size} ranks: initialise "
                             "torch.distributed with that many first (init_distributed)")
        # layer type -> the family's RoPE (Phi-3: partial; Gemma 3: a local base)
        self.rotaries = make_rotaries(self.config, self.device)
        self.collectives = Collectives(self.rank, self.world_size, self.layout.lane_sizes())
        rows = [self.layout.vocab_rows(r) for r in range(self.world_size)]
        self._vocab_parts = [len(r) for r in rows]  # rows of each rank (logits gather)

    @classmethod
    def from_model(cls, model, rank: int | None = None, world_size: int | None = None,
                   device: torch.device | str | None = None,
                   vocab_parallel: bool = True) -> DistributedCqil:
        """This rank's engine for a CqilForCausalLM in memory (rank / world size default to
        torch.distributed's)."""
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
        layout = plan_layout(model.config, world_size, vocab_parallel)
        return cls(shard_from_model(model, layout, rank, device))

    # -- embedding and head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> embeddings [B, T, d], the same on every rank (Gemma's times
        sqrt(d) rounded to their dtype, after the sum: each position has one non-zero part)."""
        rows = self.shard.vocab_rows
        if not self.layout.vocab_parallel:
            x = self.shard.embed_tokens(input_ids)
        else:
            local = input_ids - rows.start
            inside = (local >= 0) & (local < len(rows))  # [B, T]: ids among this rank's rows
            x = self.shard.embed_tokens(local.clamp(0, len(rows) - 1))  # [B, T, d]
            x = self.collectives.all_reduce(x.masked_fill(~inside[..., None], 0.0))
        return scale_embeddings(self.config, x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states x [B, T, d] (normed) -> logits [B, T, V], the same on every rank;
        the final soft-cap (Gemma) is elementwise, so each rank caps its own rows."""
        part = head_logits(self.config, self.shard.lm_head(x))  # [B, T, rows]
        if not self.layout.vocab_parallel:
            return part
        widest = max(self._vocab_parts)
        if part.shape[-1] < widest:  # gathers need equal shapes: pad, then cut each part
            part = torch.nn.functional.pad(part, (0, widest - part.shape[-1]))
        every = self.collectives.all_gather(part)  # [W, B, T, widest]
        if all(n == widest for n in self._vocab_parts):
            return every.permute(1, 2, 0, 3).reshape(*x.shape[:-1], -1)
        return torch.cat([every[r, ..., :n] for r, n in enumerate(self._vocab_parts)], dim=-1)

    # -- forward

    def _step(self, sl: LayerSlice, x, cos, sin, mask, is_causal, cache) -> torch.Tensor:
        """This rank's part of one step; x [B, T, d] (the same on every rank) -> y [B, T, d]."""
        layer = self.shard.layers[str(sl.layer)]
        attn, reduce = layer.self_attn, self.collectives.all_reduce
        t = sl.tp_size
        whole_norm = None
        if attn.qk_norm_whole and t > 1:  # OLMo 2: q/k norms over every head of the lane
            hd = self.config.head_dim
            whole_norm = (lambda square_sum: reduce(square_sum, t),
                          self.config.num_attention_heads * hd, self.config.num_key_value_heads * hd)
        # [B, h, T, hd], [B, g, T, hd]
        q, k, v = attn.project(layer.attn_input(x), cos, sin, whole_norm)
        if cache is not None:
            k, v = cache.update(k, v, sl.step)  # [B, g, S, hd]
        o_part = attn.attend(q, k, v, mask, is_causal)  # [B, T, d]: this rank's heads after o_proj
        if layer.post_norms:
            return self._post_norm_step(sl, layer, x, o_part)
        # Without post-norms a_j and m_j are linear in o and f (Granite: times r), so each rank's
        # part is its partial sum of them.
        a_part = layer.attn_output(o_part)
        if sl.group_size == 1:  # the original layer, tensor-parallel over all ranks
            h = x + reduce(a_part)  # all-reduce 1: a
            m_part = layer.mlp_delta(h)  # [B, T, d], this rank's columns
            return h + reduce(m_part)  # all-reduce 2: m
        if self.config.bypass_distance > 0:  # the same choice on every rank of the group
            # Bypass: every part of every lane; a_all[k] = a_k, whole. [P, B, T, d]
            parts = self.collectives.all_gather(a_part)  # [W, B, T, d]
            a_all = parts.view(sl.group_size, t, *a_part.shape).sum(1) if t > 1 else parts
            z = a_all[sl.member]  # a_j + b_j
            if layer.cqil_beta is not None:
                n_beta = layer.cqil_beta.shape[0]
                for r in range(n_beta):
                    z = z + layer.cqil_beta[r] * a_all[sl.member - n_beta + r]
        else:  # D = 0: only the own a_j, whole within the lane
            z = reduce(a_part.clone(), t) if t > 1 else a_part
        m_part = layer.mlp_delta(x + z)  # [B, T, d], this rank's columns
        # Σ over all ranks of γ_j ⊙ (a_part + m_part) = Σ_j γ_j ⊙ (a_j + m_j): one all-reduce.
        return x + reduce(layer.cqil_gamma * (a_part + m_part))

    def _post_norm_step(self, sl: LayerSlice, layer, x, o_part) -> torch.Tensor:
        """_step for a family with post-norms (Gemma): a_j = Na_j(o_j), m_j = Nf_j(f_j), where
        o_j and f_j are member j's attention and MLP outputs, which its lane holds in t partial
        sums (o_part, f_part [B, T, d]). A norm is not linear, so each is reduced inside the lane
        BEFORE its norm, and the deltas are no longer partial sums that one all-reduce over W
        can add. Collectives per step (t = W/P ranks per lane):
          single layer   2 all-reduces over W (o, then f), as the Llama family
          group, t = 1   as the Llama family: the all-gather of the a_k (D > 0, post-normed
                         here, on their own rank) and the all-reduce of γ_j ⊙ (a_j + m_j)
          group, t > 1   + 2 lane all-reduces (o_j, f_j) before the all-gather (D > 0) and the
                         final all-reduce, where every rank of a lane holds the same whole
                         γ_j ⊙ (a_j + m_j): its first rank adds it, the others add zeros
        (every rank of a group would have to hold every member's norm gains to do with fewer)."""
        reduce, t, P = self.collectives.all_reduce, sl.tp_size, sl.group_size
        a = layer.attn_output(reduce(o_part, t) if t > 1 else o_part)  # a_j [B, T, d], whole
        if P == 1:  # the original layer: h = x + Na(o); y = h + Nf(f), o and f over all ranks
            h = x + a
            return h + layer.mlp_output(reduce(layer.mlp(layer.mlp_input(h))))
        z = a  # a_j + b_j
        if self.config.bypass_distance > 0:  # every rank of the group takes part in the gather
            every = self.collectives.all_gather(a)  # [W, B, T, d]
            a_all = every.view(P, t, *a.shape)[:, 0] if t > 1 else every  # [P, B, T, d]: a_k
            n_beta = layer.cqil_beta.shape[0] if layer.cqil_beta is not None else 0
            for r in range(n_beta):
                z = z + layer.cqil_beta[r] * a_all[sl.member - n_beta + r]
        f = layer.mlp(layer.mlp_input(x + z))  # [B, T, d], this rank's columns
        m = layer.mlp_output(reduce(f, t) if t > 1 else f)  # m_j, whole
        delta = layer.cqil_gamma * (a + m)  # γ_j ⊙ (a_j + m_j), the same on the lane's ranks
        return x + reduce(delta if sl.tp_rank == 0 else torch.zeros_like(delta))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: RankKVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] ([B, 1, V] with last_only) of input_ids [B, T], the same on every rank.

        attention_mask [B, past + T] (1 = token, 0 = left padding) or None; position_ids [B|1, T]
        (default past..past+T-1); cache: this rank's RankKVCache (None: no cache). With
        skip_layers, a forward on a non-empty cache decodes: skipped layers are passed over.
        """
        past = cache.length if cache is not None else 0
        x = self.embed(input_ids.to(self.device))  # [B, T, d]
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=self.device)[None]  # [1, T]
        position_ids = position_ids.to(self.device)
        ropes = rope_by_type(self.rotaries, x, position_ids)  # type -> (cos, sin) [B|1, T, r]
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        # layer type -> (bool mask [B|1, 1, T, past+T] or None, is_causal)
        masks = masks_by_type(self.config, attention_mask, B, T, past, self.device)
        skipped = set(self.config.skip_layers) if past else set()
        for sl in self.shard.slices:
            if sl.layer in skipped:
                continue
            kind = self.config.layer_types[sl.layer]  # each rank runs one member's type
            x = self._step(sl, x, *ropes[kind], *masks[kind], cache)
        if cache is not None:
            cache.length += T
        return self.logits(self.shard.norm(x[:, -1:] if last_only else x))

    __call__ = forward

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int = 0, output_logits: bool = False, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None) -> DistributedGeneration:
        """Decode B left-padded prompts input_ids [B, T] (mask [B, T], 1 = token): greedy, or
        sampled with next_tokens' settings from a generator seeded with `seed` (the same on
        every rank, so every rank draws the same tokens; default 0).

        Positions count real tokens only (like transformers' generate). A sequence that produced
        an eos id continues with pad_token_id, and the loop stops when every sequence has.
        """
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long)
        mask = attention_mask.long().to(self.device)  # [B, T], grows by one column per token
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        generator = None
        if do_sample:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        stops = None
        if eos_token_id is not None:
            ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            stops = torch.tensor(ids, device=self.device)

        def pick(logits):  # [B, V] -> [B]
            return next_tokens(logits, do_sample, temperature, top_k, top_p, generator)

        cache = RankKVCache(T + max_new_tokens)
        logits = self.forward(input_ids, mask, positions, cache, last_only=not output_logits)
        kept = [logits] if output_logits else []
        tok = pick(logits[:, -1])  # [B]
        finished = torch.isin(tok, stops) if stops is not None else None
        tokens, pos = [tok], positions[:, -1:]  # pos [B, 1]
        for _ in range(max_new_tokens - 1):
            if finished is not None and bool(finished.all()):
                break
            pos = pos + 1
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # [B, past + 1]
            logits = self.forward(tok[:, None], mask, pos, cache)  # [B, 1, V]
            if output_logits:
                kept.append(logits)
            tok = pick(logits[:, -1])
            if finished is not None:
                tok = tok.masked_fill(finished, pad_token_id)
                finished = finished | torch.isin(tok, stops)
            tokens.append(tok)
        return DistributedGeneration(torch.stack(tokens, dim=1), kept)


__all__ = ["LayerSlice", "DistributedLayout", "plan_layout", "fitting_world_sizes", "TensorSlice",
           "CqilShard", "load_shard", "shard_nbytes", "safetensors_reader", "load_rank",
           "shard_from_model", "init_distributed", "Collectives", "RankKVCache", "sampling_scores",
           "next_tokens",
           "DistributedGeneration", "DistributedCqil"]
