"""The distributed engine: a converted model on W ranks of torch.distributed (docs/runtime.md).

Self-contained like its siblings (torch, transformers, the standard library, and
configuration_cqil.py / modeling_cqil.py imported relatively), so that it can travel with a
checkpoint (checkpoint.RUNTIME_FILES does not ship it yet). It computes what modeling_cqil.reference_step defines (the method: docs/method.md), with the
work of every step spread over all W ranks:

  single layer   tensor-parallel over all W ranks (Megatron split): q/k/v and gate/up split by
                 output rows (heads, MLP columns), o_proj and down_proj by input columns, kv
                 heads split (in near-equal runs when W does not divide them, each kv head with
                 its query heads). Two all-reduces: a = Σ_r a_r, then m = Σ_r m_r.
  group of P     P divides W; member j runs on lane j, the W/P consecutive ranks
                 [j*W/P, (j+1)*W/P), tensor-parallel over its lane (one rank each when P = W).
                 Each rank's attention gives a_j's part of its lane (the whole a_j on a lane of
                 one). Then, before the MLPs:
                   D > 0   one all-gather of the W attention parts over all ranks; every rank sums
                           the parts of each lane, so it holds every full a_k (its own a_j and the
                           bypass inputs a_{j-D..j-1}; it needs only D + 1 lanes' parts, so
                           point-to-point sends could move less: not done yet);
                   D = 0   nothing on lanes of one rank; on longer lanes one all-reduce inside the
                           lane gives its members the full a_j;
                 and one all-reduce over all W ranks of the parts of Σ_j γ_j ⊙ (a_j + m_j) ends the
                 group: y = x + that sum. At most two collectives per group, where tensor
                 parallelism of the same P layers pays 2P all-reduces.
  embedding, final norm, lm_head   replicated on every rank (every rank computes the same logits,
                 so every rank picks the same greedy token without a broadcast).

A row-parallel bias (o_proj, down_proj) is held by the first rank of each lane only, so that the
sums above count it once. The KV cache is per rank: one entry per step with this rank's kv heads
of its layer in that step (RankKVCache).

Collectives: plain torch.distributed calls (all_reduce in place, all_gather_single /
all_gather_into_tensor into one preallocated [W*B, T, d] tensor) on process groups created
once: dist.new_group for every lane of every lane size used (1 < W/P < W; a lane of W ranks is
the world, a lane of one needs none). Why not functional collectives or a DeviceMesh: this
engine runs eagerly, where in-place collectives avoid an allocation per call, and it needs only
the lane groups, which a (lanes x tp) DeviceMesh per group size would create along with the
cross-lane groups the world all-gather makes unnecessary. A later torch.compile / CUDA-graph
path may move to functional collectives.

Unified Layer Skipping (config skip_layers) follows modeling_cqil: a forward on an empty cache
runs every step, later forwards pass the skipped layers over.

The parts, each usable alone:
  plan_layout(config, W)          the layout: which ranks run which layer with which heads and
                                  MLP columns (pure; a ValueError names the world sizes that fit)
  CqilShard.tensor_slices()       which slice of which checkpoint tensor a rank holds
  load_shard(..., read)           the shard, from wherever read(TensorSlice) gets tensors;
  safetensors_reader(folder)      a read of only those slices from a folder's safetensors files
  load_rank(folder, rank, W)      config.json + plan_layout + load_shard over that reader
  shard_from_model(model, ...)    from a CqilForCausalLM in memory
  shard_nbytes(...)               a rank's shard bytes (the manifest's placement records them)
  init_distributed()              torch.distributed from torchrun's environment (gloo / NCCL)
  DistributedCqil                 one rank's forward (per-rank RankKVCache) and greedy generate
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .configuration_cqil import SLIDING, CqilConfig
from .modeling_cqil import CqilDecoderLayer, CqilRMSNorm, build_attention_mask

# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class LayerSlice:
    """What one rank runs of one step: its member layer and that layer's slice.

    heads / kv_heads / columns: the query heads, kv heads and MLP intermediate columns this rank
    holds (ranges of indices into the whole layer's).
    """

    step: int
    layer: int
    member: int  # j: position of the layer in its step
    group_size: int  # P (1: a single layer)
    lane: tuple[int, ...]  # the ranks that run this layer, tensor-parallel, in tp order
    tp_rank: int  # this rank's index in the lane
    heads: range
    kv_heads: range
    columns: range

    @property
    def tp_size(self) -> int:
        return len(self.lane)


@dataclass(frozen=True)
class DistributedLayout:
    """A grouping placed on W ranks (see the module docstring); build it with plan_layout."""

    world_size: int
    groups: tuple[tuple[int, ...], ...]
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    def lane_size(self, step: int) -> int:
        return self.world_size // len(self.groups[step])

    def lane_sizes(self) -> list[int]:
        """Every lane size the steps use, ascending."""
        return sorted({self.lane_size(s) for s in range(len(self.groups))})

    def slice(self, rank: int, step: int) -> LayerSlice:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is out of range 0..{self.world_size - 1}")
        group, t = self.groups[step], self.lane_size(step)
        j, i = divmod(rank, t)  # lane (member), index in the lane
        # kv heads in near-equal contiguous runs (3 kv heads on 2 ranks: 2 + 1), each with the
        # query heads that read it; MLP columns likewise.
        kv = _part(self.num_kv_heads, t, i)
        per_kv = self.num_heads // self.num_kv_heads
        return LayerSlice(step=step, layer=group[j], member=j, group_size=len(group),
                          lane=tuple(range(j * t, (j + 1) * t)), tp_rank=i,
                          heads=range(kv.start * per_kv, kv.stop * per_kv), kv_heads=kv,
                          columns=_part(self.intermediate_size, t, i))

    def slices(self, rank: int) -> list[LayerSlice]:
        """This rank's slice of every step, in step order (every rank takes part in every step)."""
        return [self.slice(rank, s) for s in range(len(self.groups))]

    def placement(self) -> dict[int, tuple[int, ...]]:
        """layer -> the ranks that run it."""
        out = {}
        for s in range(len(self.groups)):
            for first in range(0, self.world_size, self.lane_size(s)):  # first rank of each lane
                sl = self.slice(first, s)
                out[sl.layer] = sl.lane
        return out


def _part(n: int, parts: int, i: int) -> range:
    """The i-th of `parts` contiguous, near-equal runs of range(n); the first n % parts runs
    are one longer."""
    q, r = divmod(n, parts)
    start = i * q + min(i, r)
    return range(start, start + q + (1 if i < r else 0))


def _misfit(config: CqilConfig, world_size: int) -> str | None:
    """Why W ranks cannot run this grouping (None: they can)."""
    G, intermediate = config.num_key_value_heads, config.intermediate_size
    for step in config.groups:
        if world_size % len(step):
            return (f"group {step} has {len(step)} layers and a group's size must divide the "
                    f"number of ranks {world_size}")
        t = world_size // len(step)
        if t > G or t > intermediate:  # every rank of a lane needs a kv head and a column
            what = "a single layer" if len(step) == 1 else f"each member of group {step}"
            return (f"{what} would run tensor-parallel on a lane of {t} ranks but has only {G} "
                    f"kv heads and {intermediate} MLP columns (at least one of each per rank)")
    return None


def fitting_world_sizes(config: CqilConfig) -> list[int]:
    """Every world size W that can run this grouping (group sizes divide W; a lane of W/P ranks
    needs a kv head and an MLP column per rank: W <= smallest group size x min(kv heads, MLP
    width))."""
    limit = min(len(s) for s in config.groups) * min(config.num_key_value_heads,
                                                      config.intermediate_size)
    return [w for w in range(1, limit + 1) if _misfit(config, w) is None]


def plan_layout(config: CqilConfig, world_size: int) -> DistributedLayout:
    """Place a converted model's steps on `world_size` ranks (pure: no process needed).

    Raises ValueError when a group size does not divide W or a lane has more ranks than its
    layer has kv heads (or MLP columns), naming the world sizes that work. Heads and columns
    that do not divide evenly are split into near-equal runs (the first ranks get one more).
    """
    if isinstance(world_size, bool) or int(world_size) != world_size or world_size < 1:
        raise ValueError(f"the world size must be a positive integer, got {world_size!r}")
    world_size = int(world_size)
    why = _misfit(config, world_size)
    if why is not None:
        fits = fitting_world_sizes(config)
        sizes = sorted({len(s) for s in config.groups})
        hint = (f"world sizes that fit this grouping: {', '.join(map(str, fits))}" if fits else
                f"no world size fits this grouping (group sizes {sizes}, "
                f"{config.num_key_value_heads} kv heads, {config.intermediate_size} MLP columns)")
        raise ValueError(f"cannot run this model on {world_size} ranks: {why}; {hint}")
    return DistributedLayout(world_size, tuple(tuple(s) for s in config.groups),
                             config.num_attention_heads, config.num_key_value_heads,
                             config.intermediate_size)


# ----------------------------------------------------------------------------- sharding


@dataclass(frozen=True)
class TensorSlice:
    """Which part of a checkpoint tensor a rank holds: `name` (checkpoint name), narrowed to
    [start, stop) along `dim`, or whole when dim is None."""

    name: str
    dim: int | None = None
    start: int = 0
    stop: int = 0

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This slice of the whole tensor (a view)."""
        if self.dim is None:
            return tensor
        return tensor.narrow(self.dim, self.start, self.stop - self.start)


# Column-parallel linears: their output rows (weight and bias) are split, by query heads, kv
# heads or MLP columns. Row-parallel linears: their weight's input columns are split; the bias
# is whole, on the first rank of the lane only (CqilShard drops it elsewhere).
_SPLIT_ROWS = {"self_attn.q_proj": "heads", "self_attn.k_proj": "kv_heads",
               "self_attn.v_proj": "kv_heads", "mlp.gate_proj": "columns", "mlp.up_proj": "columns"}
_SPLIT_INPUTS = {"self_attn.o_proj": "heads", "mlp.down_proj": "columns"}


def _slice_config(config: CqilConfig, sl: LayerSlice) -> CqilConfig:
    """The config of one rank's slice of a layer: its head, kv head and MLP column counts."""
    c = copy.copy(config)
    c.num_attention_heads, c.num_key_value_heads = len(sl.heads), len(sl.kv_heads)
    c.intermediate_size = len(sl.columns)
    return c


class CqilShard(nn.Module):
    """The tensors one rank holds: embedding, final norm, lm_head (replicated) and its slice of
    one layer per step (`layers["N"]`: layer N with this rank's heads and columns).

    State-dict names are the checkpoint's without the leading "model." (lm_head.weight kept).
    """

    def __init__(self, config: CqilConfig, layout: DistributedLayout, rank: int):
        super().__init__()
        self.config, self.layout, self.rank = config, layout, rank
        self.slices = layout.slices(rank)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d, config.pad_token_id)
        self.layers = nn.ModuleDict()
        for sl in self.slices:
            layer = CqilDecoderLayer(_slice_config(config, sl), sl.layer, sl.member, sl.group_size)
            if sl.tp_rank != 0:  # the lane's first rank adds the row-parallel biases
                layer.self_attn.o_proj.bias = None
                layer.mlp.down_proj.bias = None
            self.layers[str(sl.layer)] = layer
        self.norm = CqilRMSNorm(d, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)

    def tensor_slices(self) -> dict[str, TensorSlice]:
        """state-dict name -> the slice of the checkpoint tensor it holds (which slice, not where
        the tensor comes from: see load_shard). A tied lm_head is left out (it is embed_tokens)."""
        hd = self.config.head_dim
        out = {}
        for name in self.state_dict():
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the embedding's tensor (load_shard ties them): read and counted once
            if not name.startswith("layers."):
                out[name] = TensorSlice(name if name == "lm_head.weight" else f"model.{name}")
                continue
            _, layer, local = name.split(".", 2)  # layers.N.<module path>.<weight|bias>
            sl = next(s for s in self.slices if s.layer == int(layer))
            module, _, kind = local.rpartition(".")
            part = _SPLIT_ROWS.get(module)
            dim = 0
            if part is None and kind == "weight":
                part, dim = _SPLIT_INPUTS.get(module), 1
            if part is None or sl.tp_size == 1:  # whole: norms, gamma, beta, row-parallel bias
                out[name] = TensorSlice(f"model.{name}")
                continue
            span = getattr(sl, part)
            scale = 1 if part == "columns" else hd  # heads are hd rows / columns each
            out[name] = TensorSlice(f"model.{name}", dim, span.start * scale, span.stop * scale)
        return out


def load_shard(config: CqilConfig, layout: DistributedLayout, rank: int,
               read: Callable[[TensorSlice], torch.Tensor], device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> CqilShard:
    """Build rank `rank`'s CqilShard, reading each tensor with `read(slice)` (the slice only).

    The shard owns its tensors (copies), in `dtype` (default: as read) on `device`.
    """
    with torch.device("meta"):
        shard = CqilShard(config, layout, rank)
    state = {}
    for name, sl in shard.tensor_slices().items():
        t = read(sl)
        state[name] = t.to(device=device, dtype=dtype or t.dtype, copy=True).contiguous()
    missing, unexpected = shard.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        shard.lm_head.weight = shard.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"shard state mismatch: missing {missing}, unexpected {unexpected}")
    return shard.eval().requires_grad_(False)


def shard_nbytes(config: CqilConfig, layout: DistributedLayout, rank: int,
                 dtypes: torch.dtype | Mapping[str, torch.dtype]) -> int:
    """Bytes of rank `rank`'s shard as load_shard reads it: each of tensor_slices()' slices,
    elements x the element size of its checkpoint tensor (dtypes: one dtype for all, or
    checkpoint name -> dtype). Pure: builds the shard on the meta device only."""
    with torch.device("meta"):
        shard = CqilShard(config, layout, rank)
    state = shard.state_dict()
    return sum(state[name].numel() * (dtypes if isinstance(dtypes, torch.dtype)
                                      else dtypes[sl.name]).itemsize
               for name, sl in shard.tensor_slices().items())


def safetensors_reader(folder: str | Path) -> Callable[[TensorSlice], torch.Tensor]:
    """A `read` for load_shard over the *.safetensors files of a converted folder.

    Each call reads its slice only (safe_open(...).get_slice(name)[rows, columns]): no rank
    reads the whole model. Tensor -> file comes from model.safetensors.index.json when the
    checkpoint is sharded, else from every file's header. Files are opened (memory-mapped)
    once, on first use, and stay open while the reader lives.
    """
    from safetensors import safe_open  # a dependency of transformers

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {name: folder / file
                 for name, file in json.loads(index.read_text())["weight_map"].items()}
    else:
        files = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                files.update(dict.fromkeys(f.keys(), path))
    if not files:
        raise ValueError(f"{folder} holds no safetensors weights")
    handles = {}

    def read(sl: TensorSlice) -> torch.Tensor:
        path = files.get(sl.name)
        if path is None:
            raise ValueError(f"{sl.name} is not in the safetensors files of {folder}")
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        if sl.dim is None:
            return handles[path].get_tensor(sl.name)
        rows_cols = (slice(None),) * sl.dim + (slice(sl.start, sl.stop),)
        return handles[path].get_slice(sl.name)[rows_cols]

    return read


def load_rank(folder: str | Path, rank: int, world_size: int, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> CqilShard:
    """Rank `rank`'s shard of the converted folder for `world_size` ranks: config.json, the
    layout (plan_layout: a ValueError when W does not fit), then only this rank's slices."""
    config = CqilConfig.from_pretrained(folder)
    layout = plan_layout(config, world_size)
    return load_shard(config, layout, rank, safetensors_reader(folder), device, dtype)


def shard_from_model(model, layout: DistributedLayout, rank: int,
                     device: torch.device | str | None = None) -> CqilShard:
    """Rank `rank`'s shard of a CqilForCausalLM in memory (its parameters sliced and copied)."""
    state = model.state_dict()
    if device is None:
        device = next(model.parameters()).device
    return load_shard(model.config, layout, rank, lambda sl: sl.take(state[sl.name]), device)


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


class RankKVCache:
    """One rank's KV cache: per step, k and v [B, this rank's kv heads, S, hd]."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.length = 0  # positions every forward so far has fed (the next query's cache position)

    def update(self, k: torch.Tensor, v: torch.Tensor,
               step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, g, T, hd] to step `step`'s entry; return the entry [B, g, S, hd]."""
        if step in self.keys:
            k = torch.cat([self.keys[step], k], dim=2)
            v = torch.cat([self.values[step], v], dim=2)
        self.keys[step], self.values[step] = k, v
        return k, v


@dataclass
class DistributedGeneration:
    tokens: torch.Tensor  # [B, n] new tokens (pad after a sequence's eos)
    logits: list[torch.Tensor]  # output_logits only: prefill [B, T, V], then [B, 1, V] per token


# ----------------------------------------------------------------------------- engine


class DistributedCqil:
    """One rank of the distributed engine: its shard, its process groups, its forward.

    Construct it on every rank, in the same order (it creates the lane process groups
    collectively). Every rank must run the same forward calls with the same inputs.
    """

    def __init__(self, shard: CqilShard):
        self.shard, self.config, self.layout = shard, shard.config, shard.layout
        self.rank, self.world_size = shard.rank, shard.layout.world_size
        self.device = shard.embed_tokens.weight.device
        joined = dist.is_initialized() and dist.get_world_size() == self.world_size
        if self.world_size > 1 and not joined:
            raise ValueError(f"the layout is for {self.world_size} ranks: initialise "
                             "torch.distributed with that many first (init_distributed)")
        with torch.device(self.device):
            self.rotary = LlamaRotaryEmbedding(config=self.config)
        # Lane process groups, created on every rank for every lane (new_group is collective).
        self._lane_group: dict[int, object] = {}
        for t in self.layout.lane_sizes():
            if 1 < t < self.world_size:
                for start in range(0, self.world_size, t):
                    group = dist.new_group(list(range(start, start + t)))
                    if start <= self.rank < start + t:
                        self._lane_group[t] = group
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    @classmethod
    def from_model(cls, model, rank: int | None = None, world_size: int | None = None,
                   device: torch.device | str | None = None) -> DistributedCqil:
        """This rank's engine for a CqilForCausalLM in memory (rank / world size default to
        torch.distributed's)."""
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
        layout = plan_layout(model.config, world_size)
        return cls(shard_from_model(model, layout, rank, device))

    # -- collectives (no-ops on one rank)

    def _all_reduce(self, t: torch.Tensor, lane_size: int | None = None) -> torch.Tensor:
        """Sum t over all ranks (lane_size None or W) or over this rank's lane, in place."""
        if lane_size == 1 or self.world_size == 1:
            return t
        group = None if lane_size in (None, self.world_size) else self._lane_group[lane_size]
        dist.all_reduce(t, group=group)
        return t

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """t [B, T, d] of every rank -> [W, B, T, d], in rank order."""
        if self.world_size == 1:
            return t[None]
        out = t.new_empty((self.world_size * t.shape[0], *t.shape[1:]))  # [W*B, T, d] (gloo
        self._gather(out, t.contiguous())  # takes the concatenated form, not the stacked one)
        return out.view(self.world_size, *t.shape)

    # -- forward

    def _step(self, sl: LayerSlice, x, cos, sin, mask, is_causal, cache) -> torch.Tensor:
        """This rank's part of one step; x [B, T, d] (the same on every rank) -> y [B, T, d]."""
        layer = self.shard.layers[str(sl.layer)]
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm(x), cos, sin)  # [B, h, T, hd], [B, g, T, hd]
        if cache is not None:
            k, v = cache.update(k, v, sl.step)  # [B, g, S, hd]
        a_part = attn.attend(q, k, v, mask, is_causal)  # [B, T, d]: this rank's heads after o_proj
        t = sl.tp_size
        if sl.group_size == 1:  # the original layer, tensor-parallel over all ranks
            h = x + self._all_reduce(a_part)  # all-reduce 1: a
            m_part = layer.mlp(layer.post_attention_layernorm(h))  # [B, T, d], this rank's columns
            return h + self._all_reduce(m_part)  # all-reduce 2: m
        if self.config.bypass_distance > 0:  # the same choice on every rank of the group
            # Bypass: every part of every lane; a_all[k] = a_k, whole. [P, B, T, d]
            parts = self._all_gather(a_part)  # [W, B, T, d]
            a_all = parts.view(sl.group_size, t, *a_part.shape).sum(1) if t > 1 else parts
            z = a_all[sl.member]  # a_j + b_j
            if layer.cqil_beta is not None:
                n_beta = layer.cqil_beta.shape[0]
                for r in range(n_beta):
                    z = z + layer.cqil_beta[r] * a_all[sl.member - n_beta + r]
        else:  # D = 0: only the own a_j, whole within the lane
            z = self._all_reduce(a_part.clone(), t) if t > 1 else a_part
        m_part = layer.mlp(layer.post_attention_layernorm(x + z))  # [B, T, d], this rank's columns
        # Σ over all ranks of γ_j ⊙ (a_part + m_part) = Σ_j γ_j ⊙ (a_j + m_j): one all-reduce.
        return x + self._all_reduce(layer.cqil_gamma * (a_part + m_part))

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
        x = self.shard.embed_tokens(input_ids.to(self.device))  # [B, T, d]
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=self.device)[None]  # [1, T]
        cos, sin = self.rotary(x, position_ids.to(self.device))  # [B|1, T, hd]
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        masks = {}  # layer type -> (bool mask [B|1, 1, T, past+T] or None, is_causal)
        for kind in set(self.config.layer_types):
            window = self.config.sliding_window if kind == SLIDING else None
            masks[kind] = build_attention_mask(attention_mask, B, T, past, window, self.device)
        skipped = set(self.config.skip_layers) if past else set()
        for sl in self.shard.slices:
            if sl.layer in skipped:
                continue
            x = self._step(sl, x, cos, sin, *masks[self.config.layer_types[sl.layer]], cache)
        if cache is not None:
            cache.length += T
        x = self.shard.norm(x[:, -1:] if last_only else x)
        return self.shard.lm_head(x)

    __call__ = forward

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16, eos_token_id: int | None = None, pad_token_id: int = 0,
                 output_logits: bool = False) -> DistributedGeneration:
        """Greedy decoding of B left-padded prompts input_ids [B, T] (mask [B, T], 1 = token).

        Positions count real tokens only (like transformers' generate). Every rank computes the
        same tokens; a sequence that produced eos_token_id continues with pad_token_id, and the
        loop stops when every sequence has.
        """
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long)
        mask = attention_mask.long().to(self.device)  # [B, T], grows by one column per token
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        cache = RankKVCache()
        logits = self.forward(input_ids, mask, positions, cache, last_only=not output_logits)
        kept = [logits] if output_logits else []
        tok = logits[:, -1].argmax(-1)  # [B]
        finished = tok == eos_token_id if eos_token_id is not None else None
        tokens, pos = [tok], positions[:, -1:]  # pos [B, 1]
        for _ in range(max_new_tokens - 1):
            if finished is not None and bool(finished.all()):
                break
            pos = pos + 1
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # [B, past + 1]
            logits = self.forward(tok[:, None], mask, pos, cache)  # [B, 1, V]
            if output_logits:
                kept.append(logits)
            tok = logits[:, -1].argmax(-1)
            if finished is not None:
                tok = tok.masked_fill(finished, pad_token_id)
                finished = finished | (tok == eos_token_id)
            tokens.append(tok)
        return DistributedGeneration(torch.stack(tokens, dim=1), kept)


__all__ = ["LayerSlice", "DistributedLayout", "plan_layout", "fitting_world_sizes", "TensorSlice",
           "CqilShard", "load_shard", "shard_nbytes", "safetensors_reader", "load_rank",
           "shard_from_model", "init_distributed", "RankKVCache", "DistributedGeneration",
           "DistributedCqil"]
