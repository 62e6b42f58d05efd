"""How the distributed engine (distributed_cqil.py) spreads a converted model over W ranks, and
what each rank reads: the layout, the shards, a reader of only those slices (docs/runtime.md,
"Distributed engine").

Self-contained like its siblings (torch, transformers, the standard library, and
configuration_cqil.py / families_cqil.py imported relatively), so that it travels with a
checkpoint (checkpoint.RUNTIME_FILES). Pure: nothing here needs a process group. Every family
the runtime runs (families_cqil.py) shards the same way: a rank's slice of a layer is that
family's layer with fewer heads and columns. Phi-3's fused qkv_proj [(H+2G)*hd, d] and
gate_up_proj [2I, d] keep their checkpoint names: a rank takes its heads' rows of q, k and v
(three runs of rows, concatenated: its q | k | v) and its columns' rows of gate and up (two runs:
its gate | up), which is the fused layout of its own slice.

  single layer   tensor-parallel over all W ranks (Megatron split): q/k/v and gate/up split by
                 output rows (heads, MLP columns), o_proj and down_proj by input columns. kv heads
                 are split in near-equal contiguous runs (3 kv heads on 2 ranks: 2 + 1), each with
                 its query heads; where the heads split unevenly, the MLP columns are split so
                 that every rank of the lane holds the same weight bytes (a decode step streams
                 its weights, so equal bytes is equal time, and the slowest rank sets the pace).
  group of P     P divides W; member j runs on lane j, the W/P consecutive ranks
                 [j*W/P, (j+1)*W/P), tensor-parallel over its lane as above (whole on a lane of
                 one rank).
  embedding, lm_head   vocab-parallel (default): rank r holds the r-th near-equal run of the
                 vocabulary's rows of both (one tensor when tied); or replicated whole on every
                 rank (vocab_parallel=False). Final norm: replicated.

A row-parallel bias (o_proj, down_proj) is held by the first rank of each lane only, so that the
engine's sums count it once.

Quantized folders (config `weights`, quant_cqil.py): the shard's linears are QuantLinear, built
as CqilForCausalLM builds them (swap_linears), and a rank reads only its slices of the stored
tensors. Column-parallel: qweight, scales and zeros by output rows, as the weight. Row-parallel:
int8 qweight by input columns with its per-row scales whole; int4's packed qweight by byte
columns [a/2, b/2) and its scales and zeros by groups [a/G, b/G), so every rank's input columns
must start at a multiple of the group size G: the MLP columns are split in units of G
(`column_align`: 96 columns, G = 32, on 2 ranks: 64 + 32), and a layout whose o_proj split (by
heads) is not aligned is refused before anything loads. The lm_head (int8) is split by rows; the
embedding stays dense.

  plan_layout(config, W)          the layout (a ValueError names the world sizes that fit)
  CqilShard.tensor_slices()       which slice of which checkpoint tensor a rank holds
  load_shard(..., read)           the shard, from wherever read(TensorSlice) gets tensors
  safetensors_reader(folder)      a read of only those slices from a folder's safetensors files
  load_rank(folder, rank, W)      config.json + plan_layout + load_shard over that reader
  shard_from_model(model, ...)    from a CqilForCausalLM in memory
  shard_nbytes(...)               a rank's shard bytes (the manifest's placement records them)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .configuration_cqil import CqilConfig
from .families_cqil import CqilDecoderLayer, make_norm, qkv_row_slices
from .quant_cqil import QuantLinear, WeightScheme, check_quantized, is_quantized, swap_linears

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
    hidden_size: int
    head_dim: int
    vocab_size: int
    vocab_parallel: bool = True
    column_align: int = 1  # MLP column splits at multiples of it (int4 weights: the group size)

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
        kv = _part(self.num_kv_heads, t, i)
        per_kv = self.num_heads // self.num_kv_heads
        return LayerSlice(step=step, layer=group[j], member=j, group_size=len(group),
                          lane=tuple(range(j * t, (j + 1) * t)), tp_rank=i,
                          heads=range(kv.start * per_kv, kv.stop * per_kv), kv_heads=kv,
                          columns=self.columns(t)[i])

    def columns(self, lane_size: int) -> list[range]:
        """The MLP columns of each rank of a lane of `lane_size` ranks.

        Near-equal runs when the lane's attention slices are equal; else runs sized so that
        each rank's slice of the layer has the same weight elements: rank i holds
        2*hd*d*(heads_i + kv_i) attention elements (q and o rows, k and v rows) and 3*d per MLP
        column (gate, up, down), so it gets (total/t - attention_i) / 3d columns, rounded at
        the cumulative boundaries (each rank keeps at least one).

        With column_align g > 1 (int4 weights: down_proj's scales cover g input columns each)
        the same split in units of g columns: every boundary a multiple of g (96 columns, g = 32,
        on 2 ranks: 64 + 32)."""
        t, g = lane_size, self.column_align
        n = self.intermediate_size // g  # units of g columns
        per_kv, unit = self.num_heads // self.num_kv_heads, 2 * self.head_dim * self.hidden_size
        attention = [unit * len(_part(self.num_kv_heads, t, i)) * (per_kv + 1) for i in range(t)]
        runs = even = [_part(n, t, i) for i in range(t)]
        if len(set(attention)) > 1:
            per_unit = 3 * self.hidden_size * g
            target = (sum(attention) + per_unit * n) / t
            bounds, total = [0], 0.0
            for i in range(t - 1):
                total += (target - attention[i]) / per_unit
                bounds.append(round(total))
            bounds.append(n)
            runs = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            runs = runs if all(len(r) >= 1 for r in runs) else even
        return [range(r.start * g, self.intermediate_size if r.stop == n else r.stop * g) for r in runs]

    def vocab_rows(self, rank: int) -> range:
        """The rows of the embedding and lm_head rank `rank` holds (all of them when
        replicated)."""
        if not self.vocab_parallel:
            return range(self.vocab_size)
        return _part(self.vocab_size, self.world_size, rank)

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


def _column_align(config: CqilConfig) -> int:
    """The multiple every rank's input columns of a row-parallel linear must start at: int4's
    group size (a rank holds whole groups of scales and zeros), else 1."""
    scheme = WeightScheme.from_json(getattr(config, "weights", None))
    return scheme.group_size if scheme is not None and scheme.format == "int4" else 1


def _misfit(config: CqilConfig, world_size: int) -> str | None:
    """Why W ranks cannot run this grouping (None: they can). Every family CqilConfig accepts
    runs; only the grouping, the head and column counts and, for int4 weights, the alignment of
    the row-parallel splits to the group size matter."""
    G, intermediate = config.num_key_value_heads, config.intermediate_size
    align, hd = _column_align(config), config.head_dim
    for step in config.groups:
        if world_size % len(step):
            return (f"group {step} has {len(step)} layers and a group's size must divide the "
                    f"number of ranks {world_size}")
        t = world_size // len(step)
        if t > G or t > intermediate:  # every rank of a lane needs a kv head and a column
            what = "a single layer" if len(step) == 1 else f"each member of group {step}"
            return (f"{what} would run tensor-parallel on a lane of {t} ranks but has only {G} "
                    f"kv heads and {intermediate} MLP columns (at least one of each per rank)")
        if align == 1:
            continue
        if t > intermediate // align:
            return (f"a lane of {t} ranks needs a group of int4 group size {align} of the MLP's "
                    f"{intermediate} input columns per rank (down_proj has {intermediate // align})")
        per_kv = config.num_attention_heads // G
        for i in range(1, t):
            start = _part(G, t, i).start * per_kv * hd  # o_proj's input columns split by heads
            if start % align:
                return (f"on a lane of {t} ranks o_proj's input columns split at column {start}, "
                        f"not a multiple of the int4 group size {align}")
    return None


def fitting_world_sizes(config: CqilConfig) -> list[int]:
    """Every world size W that can run this grouping (group sizes divide W; a lane of W/P ranks
    needs a kv head and an MLP column per rank: W <= smallest group size x min(kv heads, MLP
    width); int4 weights: the lanes' row-parallel splits aligned to the group size)."""
    limit = min(len(s) for s in config.groups) * min(config.num_key_value_heads,
                                                      config.intermediate_size)
    return [w for w in range(1, limit + 1) if _misfit(config, w) is None]


def plan_layout(config: CqilConfig, world_size: int,
                vocab_parallel: bool = True) -> DistributedLayout:
    """Place a converted model's steps on `world_size` ranks (pure: no process needed).

    vocab_parallel: split the embedding and lm_head by vocabulary rows (False: replicate them).

    Raises ValueError when a group size does not divide W or a lane has more ranks than its
    layer has kv heads (or MLP columns), or, for int4 weights, a lane's o_proj split (by heads)
    is not at a multiple of the group size, naming the world sizes that work. Heads and columns
    that do not divide evenly are split into near-equal runs (the first ranks get one more; int4
    MLP columns in runs of whole groups).
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
                             config.intermediate_size, config.hidden_size, config.head_dim,
                             config.vocab_size, vocab_parallel and world_size > 1,
                             _column_align(config))


# ----------------------------------------------------------------------------- sharding


@dataclass(frozen=True)
class TensorSlice:
    """Which part of a checkpoint tensor a rank holds: `name` (checkpoint name), narrowed to
    [start, stop) along `dim`, or whole when dim is None. `more_runs`: further [start, stop)
    runs along `dim`, concatenated after the first in order (a fused tensor, Phi-3's qkv_proj
    and gate_up_proj: a rank's q | k | v rows, its gate | up rows)."""

    name: str
    dim: int | None = None
    start: int = 0
    stop: int = 0
    more_runs: tuple[tuple[int, int], ...] = ()

    @property
    def runs(self) -> tuple[tuple[int, int], ...]:
        """Every [start, stop) run along dim, in the order they are concatenated."""
        return ((self.start, self.stop), *self.more_runs)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This slice of the whole tensor (a view when it is one run, else a new tensor)."""
        if self.dim is None:
            return tensor
        parts = [tensor.narrow(self.dim, a, b - a) for a, b in self.runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


# Column-parallel linears: their output rows (weight and bias) are split, by query heads, kv
# heads or MLP columns (the fused ones, "qkv" and "gate_up", in several runs of rows: _fused_runs).
# Row-parallel linears: their weight's input columns are split; the bias is whole, on the first
# rank of the lane only (CqilShard drops it elsewhere).
_SPLIT_ROWS = {"self_attn.q_proj": "heads", "self_attn.k_proj": "kv_heads",
               "self_attn.v_proj": "kv_heads", "mlp.gate_proj": "columns", "mlp.up_proj": "columns",
               "self_attn.qkv_proj": "qkv", "mlp.gate_up_proj": "gate_up"}
_SPLIT_INPUTS = {"self_attn.o_proj": "heads", "mlp.down_proj": "columns"}
_WHOLE_QK_NORMS = {"self_attn.q_norm": "heads", "self_attn.k_norm": "kv_heads"}  # [H*hd], [G*hd]


def _fused_runs(config: CqilConfig, sl: LayerSlice, part: str) -> list[tuple[int, int]]:
    """The rows [start, stop) of a fused weight that rank slice `sl` holds, in its own fused
    order: "qkv" (rows q of every head, then k, then v: families_cqil.qkv_row_slices) -> its
    heads' q rows, its kv heads' k rows, their v rows; "gate_up" (rows gate, then up) -> its
    columns of gate, then of up."""
    if part == "gate_up":
        cols, width = sl.columns, config.intermediate_size
        return [(cols.start, cols.stop), (width + cols.start, width + cols.stop)]
    hd = config.head_dim
    spans = qkv_row_slices(config.num_attention_heads, config.num_key_value_heads, hd)
    return [(spans[name][0] + heads.start * hd, spans[name][0] + heads.stop * hd)
            for name, heads in (("q", sl.heads), ("k", sl.kv_heads), ("v", sl.kv_heads))]


def slice_config(config: CqilConfig, sl: LayerSlice) -> CqilConfig:
    """The config of one rank's slice of a layer: its head, kv head and MLP column counts."""
    c = copy.copy(config)
    c.num_attention_heads, c.num_key_value_heads = len(sl.heads), len(sl.kv_heads)
    c.intermediate_size = len(sl.columns)
    return c


class CqilShard(nn.Module):
    """The tensors one rank holds: its rows of the embedding and lm_head (layout.vocab_rows),
    the final norm, and its slice of one layer per step (`layers["N"]`: layer N with this rank's
    heads and columns).

    State-dict names are the checkpoint's without the leading "model." (lm_head.weight kept).
    """

    def __init__(self, config: CqilConfig, layout: DistributedLayout, rank: int):
        super().__init__()
        self.config, self.layout, self.rank = config, layout, rank
        self.slices = layout.slices(rank)
        d = config.hidden_size
        self.vocab_rows = layout.vocab_rows(rank)
        rows = len(self.vocab_rows)
        # No padding_idx: it only zeroes a row's gradient, and the row may be another rank's.
        self.embed_tokens = nn.Embedding(rows, d)
        self.layers = nn.ModuleDict()
        for sl in self.slices:
            # the family's own layer (norms, fused projections, q/k norms), with fewer heads
            layer = CqilDecoderLayer(slice_config(config, sl), sl.layer, sl.member, sl.group_size)
            if sl.tp_rank != 0:  # the lane's first rank adds the row-parallel biases
                layer.self_attn.o_proj.bias = None
                layer.mlp.down_proj.bias = None
            self.layers[str(sl.layer)] = layer
        self.norm = make_norm(config, d)  # the family's final norm (Gemma: 1 + weight)
        self.lm_head = nn.Linear(d, rows, bias=False)
        if config.weights:  # quantized: QuantLinear, as CqilForCausalLM builds them
            swap_linears(self, WeightScheme.from_json(config.weights))

    def tensor_slices(self) -> dict[str, TensorSlice]:
        """state-dict name -> the slice of the checkpoint tensor it holds (which slice, not where
        the tensor comes from: see load_shard). A tied lm_head is left out (it is embed_tokens).
        A QuantLinear's qweight, scales and zeros are sliced as the module docstring says."""
        hd = self.config.head_dim
        out = {}
        for name in self.state_dict():
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the embedding's tensor (load_shard ties them): read and counted once
            if not name.startswith("layers."):
                head = name.startswith("lm_head.")  # weight, or qweight and scales (by rows)
                source = name if head else f"model.{name}"
                rows = self.vocab_rows
                if (head or name == "embed_tokens.weight") and self.layout.vocab_parallel:
                    out[name] = TensorSlice(source, 0, rows.start, rows.stop)
                else:
                    out[name] = TensorSlice(source)
                continue
            _, layer, local = name.split(".", 2)  # layers.N.<module path>.<weight|bias>
            sl = next(s for s in self.slices if s.layer == int(layer))
            module, _, kind = local.rpartition(".")
            part = _SPLIT_ROWS.get(module)
            if getattr(self.config, "qk_norm_whole", False):  # OLMo 2: a gain per q/k channel
                part = _WHOLE_QK_NORMS.get(module, part)
            dim, per = 0, 1  # per: input columns per element of the stored tensor along dim 1
            if part is None and kind in ("weight", "qweight", "scales", "zeros"):
                part, dim = _SPLIT_INPUTS.get(module), 1
                if part is not None and kind != "weight":
                    per = _columns_per_element(self.get_submodule(f"layers.{layer}.{module}"), kind)
            # whole: norms, gamma, beta, row-parallel bias, int8 row-parallel scales (per row)
            if part is None or sl.tp_size == 1 or per is None:
                out[name] = TensorSlice(f"model.{name}")
                continue
            if part in ("qkv", "gate_up"):  # Phi-3's fused rows: several runs
                (start, stop), *more = _fused_runs(self.config, sl, part)
                out[name] = TensorSlice(f"model.{name}", dim, start, stop, tuple(more))
                continue
            span = getattr(sl, part)
            scale = 1 if part == "columns" else hd  # heads are hd rows / columns each
            start, stop = span.start * scale, span.stop * scale
            if start % per or stop % per:  # plan_layout refuses such layouts; a hand-made one
                raise ValueError(f"{name}: input columns {start}..{stop} are not whole int4 groups "
                                 f"of {per} (the group size)")
            out[name] = TensorSlice(f"model.{name}", dim, start // per, stop // per)
        return out


def _columns_per_element(linear: nn.Module, kind: str) -> int | None:
    """Input columns per element along dim 1 of a row-parallel QuantLinear's stored tensor
    `kind`: int8 qweight 1 (its scales, one per output row: None, whole); int4 qweight 2 (two
    codes a byte), scales and zeros the group size."""
    if not isinstance(linear, QuantLinear):
        raise ValueError(f"{kind} belongs to a quantized linear; this shard's is {type(linear).__name__}")
    if linear.bits == 8:
        return 1 if kind == "qweight" else None
    return 2 if kind == "qweight" else linear.group_size


def load_shard(config: CqilConfig, layout: DistributedLayout, rank: int,
               read: Callable[[TensorSlice], torch.Tensor], device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> CqilShard:
    """Build rank `rank`'s CqilShard, reading each tensor with `read(slice)` (the slice only).

    The shard owns its tensors (copies), in `dtype` (default: as read; quantized codes keep
    theirs) on `device`. Quantized: scales that are not finite and positive, or codes of the
    wrong dtype, are refused in one line (quant_cqil.check_quantized).
    """
    with torch.device("meta"):
        shard = CqilShard(config, layout, rank)
    state = {}
    for name, sl in shard.tensor_slices().items():
        t = read(sl)
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        state[name] = t.to(device=device, dtype=cast, copy=True).contiguous()
    missing, unexpected = shard.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings and not is_quantized(shard.lm_head):
        shard.lm_head.weight = shard.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"shard state mismatch: missing {missing}, unexpected {unexpected}")
    if config.weights:
        check_quantized(shard, f"rank {rank}'s shard")
    return shard.eval().requires_grad_(False)


def shard_nbytes(config: CqilConfig, layout: DistributedLayout, rank: int,
                 dtypes: torch.dtype | Mapping[str, torch.dtype]) -> int:
    """Bytes of rank `rank`'s shard as load_shard reads it: each of tensor_slices()' slices,
    elements x the element size of its checkpoint tensor (dtypes: one dtype for all floating
    tensors, quantized codes counted in their own int8 / uint8, or checkpoint name -> dtype).
    Pure: builds the shard on the meta device only."""
    with torch.device("meta"):
        shard = CqilShard(config, layout, rank)
    state = shard.state_dict()

    def size(name: str, source: str) -> int:
        if isinstance(dtypes, torch.dtype):
            return dtypes.itemsize if state[name].is_floating_point() else state[name].element_size()
        return dtypes[source].itemsize

    return sum(state[name].numel() * size(name, sl.name) for name, sl in shard.tensor_slices().items())


def safetensors_reader(folder: str | Path) -> Callable[[TensorSlice], torch.Tensor]:
    """A `read` for load_shard over the *.safetensors files of a converted folder.

    Each call reads its slice only (safe_open(...).get_slice(name)[rows, columns], one read per
    run of a fused tensor's slice, concatenated; quantized codes, int8 or uint8, likewise): no
    rank reads the whole model. Tensor -> file comes from model.safetensors.index.json when the
    checkpoint is sharded, else from every file's header. Files are opened (memory-mapped) once,
    on first use, and stay open while the reader lives.
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
        whole = handles[path].get_slice(sl.name)
        parts = [whole[(slice(None),) * sl.dim + (slice(a, b),)] for a, b in sl.runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=sl.dim)

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
