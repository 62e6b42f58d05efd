"""Decode latency of a converted model on W ranks of the distributed engine: an alpha-beta model.

The engine's work per generated token, batch B, hidden d, vocabulary V, e bytes per element
(the contract of cqil_cli/runtime/distributed_cqil.py; docs/runtime.md#distributed-engine):

  embedding      vocab-parallel lookup (V/W rows per rank), then 1 all-reduce over W of B·d·e bytes
  single layer   tensor-parallel over all W: layer_s(W), then 2 all-reduces over W of B·d·e
  group of P     P divides W; each member on its own lane of t = W/P ranks: layer_s(t), then
                   D > 0          1 all-gather over W (each rank contributes B·d·e)
                   D = 0, t > 1   1 all-reduce over the t ranks of a lane, of B·d·e
                   D = 0, t = 1   nothing
                 and 1 all-reduce over W of B·d·e
                 post-norm families (Gemma: post_norms), t > 1: the member's attention output
                 o_j and MLP output f_j are each summed inside the lane before their norms,
                 2 all-reduces over t of B·d·e, with the all-gather (D > 0) between them and the
                 lane all-reduce of D = 0 replaced: 3 collectives per group at D = 0, 4 at D > 0
                 (DistributedCqil._post_norm_step); single layers and lanes of one as above
  head           final norm + vocab-parallel lm_head: head_s(W), then 1 all-gather over W, each
                 rank contributing B·⌈V/W⌉·e (full logits on every rank)
  W = 1          no collectives, lane size 1 everywhere

A collective of `kind` over n ranks of b bytes costs alpha(kind, n) + beta(kind, n)·b seconds
(for an all-gather b is what one rank contributes). A step costs its compute plus its
collectives: ranks run in lockstep, so compute is the slowest rank's (with an uneven split of
heads, layer_s is the rank with the most). Costs are keyed by (kind, n): every group of n ranks
the engine forms (the world, or lanes of consecutive ranks) is assumed to cost the same, which
holds while lanes stay inside a node.

The parts:
  CollectiveCost        alpha and beta of one (kind, n); `fit` from micro-benchmark samples,
                        `from_bus_bandwidth` from a latency and nccl-tests' bus bandwidth
  ComputeCost           layer_s per lane size, head_s per world size, embed_s, overhead_s
  from_weight_bytes     a ComputeCost from bytes read per token and a memory bandwidth, for a
                        device where nothing was measured; DecoderShape gives those bytes
  ParallelLatencyModel  predict_token_s, ratio against the plain model's TP on the same W,
                        predicted_record (the manifest's `predicted`), to_json / from_json
  search_latency        what search/partitions.py needs (a LatencyModel), from this model
Pure Python: no torch (search_latency imports search/latency_model.py, which does).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from ..core.errors import CqilError

ALL_REDUCE = "all_reduce"
ALL_GATHER = "all_gather"
KINDS = (ALL_REDUCE, ALL_GATHER)

Call = tuple[str, int, int]  # one collective: (kind, n ranks, bytes; per rank for an all-gather)


# ----------------------------------------------------------------------------- collectives


@dataclass(frozen=True)
class CollectiveCost:
    """One collective `kind` over `n_ranks` ranks: alpha_s + beta_s_per_byte · bytes seconds."""

    kind: str
    n_ranks: int
    alpha_s: float
    beta_s_per_byte: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise CqilError(f"unknown collective {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.n_ranks < 2:
            raise CqilError(f"a collective needs at least 2 ranks, got {self.n_ranks}")
        if self.alpha_s < 0 or self.beta_s_per_byte < 0:
            raise CqilError(f"{self.kind} over {self.n_ranks} ranks: alpha and beta must be ≥ 0")

    def seconds(self, nbytes: float) -> float:
        return self.alpha_s + self.beta_s_per_byte * nbytes

    @classmethod
    def fit(cls, samples: Iterable[tuple[float, float]], *, kind: str,
            n_ranks: int) -> CollectiveCost:
        """Non-negative least squares of seconds = alpha + beta · bytes.

        samples: (bytes, seconds) pairs from a micro-benchmark, repeats allowed; the median at
        each size is fitted (a repeat slowed by a stray stall moves it less than the mean).
        Needs at least two distinct sizes.
        """
        by_size: dict[float, list[float]] = {}
        for nbytes, seconds in samples:
            if nbytes < 0 or seconds < 0 or not math.isfinite(seconds):
                raise CqilError(f"bad {kind} sample ({nbytes} bytes, {seconds} s)")
            by_size.setdefault(float(nbytes), []).append(float(seconds))
        if len(by_size) < 2:
            raise CqilError(f"fitting {kind} over {n_ranks} ranks needs samples at two or more "
                            f"message sizes, got {len(by_size)}")
        xs = sorted(by_size)
        ys = [statistics.median(by_size[x]) for x in xs]
        alpha, beta = _nonnegative_line(xs, ys)
        return cls(kind, n_ranks, alpha, beta)

    @classmethod
    def from_bus_bandwidth(cls, kind: str, n_ranks: int, alpha_s: float,
                           bus_bytes_per_s: float) -> CollectiveCost:
        """beta from nccl-tests' bus bandwidth (its doc/PERFORMANCE.md): an all-reduce of b bytes
        moves 2(n−1)/n · b per rank, an all-gather of b bytes from each rank (n−1) · b."""
        per_byte = 2 * (n_ranks - 1) / n_ranks if kind == ALL_REDUCE else n_ranks - 1
        return cls(kind, n_ranks, alpha_s, per_byte / bus_bytes_per_s)


def _nonnegative_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """argmin over a, b ≥ 0 of Σ (a + b·x − y)²: the unconstrained fit when it is feasible, else
    the better of the two boundary fits (b = 0: a = mean y; a = 0: b = Σxy / Σx²), each clipped
    at 0 (for two variables the optimum lies on one of these)."""
    pairs = list(zip(xs, ys, strict=True))
    n = len(pairs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx > 0:
        b = sum((x - mx) * (y - my) for x, y in pairs) / sxx
        a = my - b * mx
        if a >= 0 and b >= 0:
            return a, b
    sx2 = sum(x * x for x in xs)
    through_origin = max(0.0, sum(x * y for x, y in pairs) / sx2) if sx2 > 0 else 0.0
    candidates = [(max(0.0, my), 0.0), (0.0, through_origin)]
    return min(candidates, key=lambda ab: sum((ab[0] + ab[1] * x - y) ** 2 for x, y in pairs))


# ----------------------------------------------------------------------------- compute


@dataclass
class ComputeCost:
    """Seconds of compute per generated token, the slowest rank's.

    layer_s[t]: one rank's share of one layer on a lane of t ranks (t = W for a single layer,
    W/P for a member of a group of P); head_s[W]: final norm + this rank's V/W rows of the
    lm_head on W ranks; embed_s: the embedding lookup; overhead_s: anything else per token
    (sampling, the loop).
    """

    layer_s: dict[int, float]
    head_s: dict[int, float]
    embed_s: float = 0.0
    overhead_s: float = 0.0

    def layer(self, lane_size: int) -> float:
        if lane_size not in self.layer_s:
            raise CqilError(f"no layer time for lanes of {lane_size} ranks (known: "
                            f"{sorted(self.layer_s)})")
        return self.layer_s[lane_size]

    def head(self, world_size: int) -> float:
        if world_size not in self.head_s:
            raise CqilError(f"no head time for {world_size} ranks (known: {sorted(self.head_s)})")
        return self.head_s[world_size]


def from_weight_bytes(layer_bytes: Mapping[int, float], head_bytes: Mapping[int, float],
                      bandwidth_bytes_per_s: float, layer_overhead_s: float, *,
                      efficiency: float = 1.0, head_overhead_s: float = 0.0,
                      embed_s: float = 0.0, overhead_s: float = 0.0) -> ComputeCost:
    """A ComputeCost for a device where nothing was measured: at batch 1 decode streams every
    weight once per token, so a layer costs a fixed overhead (kernel launches and small
    kernels) plus the bytes one rank reads over the memory bandwidth it achieves.

    layer_bytes[t]: the slowest rank's bytes of one layer on a lane of t ranks (weights, plus
    the KV cache it reads); head_bytes[W]: the lm_head slice of one rank on W ranks
    (DecoderShape gives both). efficiency: the fraction of the datasheet bandwidth that
    weight-streaming kernels reach.
    """
    if bandwidth_bytes_per_s <= 0 or not 0 < efficiency <= 1:
        raise CqilError("the bandwidth must be positive and the efficiency in (0, 1]")
    rate = bandwidth_bytes_per_s * efficiency
    return ComputeCost({t: layer_overhead_s + b / rate for t, b in layer_bytes.items()},
                       {w: head_overhead_s + b / rate for w, b in head_bytes.items()},
                       embed_s, overhead_s)


def divisors(n: int) -> list[int]:
    return [t for t in range(1, n + 1) if n % t == 0]


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-family decoder that decide its bytes per token (a published config)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config, name: str = "") -> DecoderShape:
        """From a transformers config (or anything with its attribute names)."""
        return cls(name or getattr(config, "name_or_path", ""), config.num_hidden_layers,
                   config.hidden_size, config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   config.intermediate_size, config.vocab_size,
                   getattr(config, "head_dim", None) or 0)

    def layer_elements(self, lane_size: int, batch: int = 1, context_tokens: int = 0) -> int:
        """Elements the slowest rank reads for one layer on a lane of `lane_size` ranks: its
        q/k/v/o rows and columns, its MLP columns, both norms, and its kv heads' cache.

        Split as plan_layout splits (distributed_cqil.py): kv heads in near-equal contiguous
        runs with their query heads, MLP columns likewise; the first rank holds the longest runs.
        """
        d, hd = self.hidden_size, self.dim_per_head
        kv = -(-self.num_kv_heads // lane_size)  # ceil: the first rank's kv heads
        q = kv * (self.num_heads // self.num_kv_heads)
        columns = -(-self.intermediate_size // lane_size)
        weights = d * hd * (2 * q + 2 * kv) + 3 * d * columns + 2 * d
        cache = batch * context_tokens * 2 * kv * hd
        return weights + cache

    def head_elements(self, world_size: int) -> int:
        """The final norm and this rank's ⌈V/W⌉ rows of the lm_head."""
        return self.hidden_size * (1 + -(-self.vocab_size // world_size))

    def compute_cost(self, world_size: int, element_bytes: float, bandwidth_bytes_per_s: float,
                     layer_overhead_s: float, *, batch: int = 1, context_tokens: int = 0,
                     **kwargs) -> ComputeCost:
        """from_weight_bytes for every lane size W's groupings can use (the divisors of W)."""
        layers = {t: element_bytes * self.layer_elements(t, batch, context_tokens)
                  for t in divisors(world_size)}
        heads = {world_size: element_bytes * self.head_elements(world_size)}
        return from_weight_bytes(layers, heads, bandwidth_bytes_per_s, layer_overhead_s, **kwargs)


# ----------------------------------------------------------------------------- the model


@dataclass
class TokenLatency:
    """The predicted decode time of one token and where it goes."""

    seconds: float
    compute_s: float
    collective_s: float
    collectives: int  # collective calls per token
    calls: dict[str, int] = field(default_factory=dict)  # "all_reduce/8" -> count
    steps: int = 0  # sequential steps (single layers and groups)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ParallelLatencyModel:
    """Decode seconds per token of any grouping on W ranks, from measured (or derived) costs."""

    hidden_size: int
    vocab_size: int
    element_bytes: float
    compute: ComputeCost
    collectives: dict[tuple[str, int], CollectiveCost]
    source: str = ""  # where the numbers come from, in words
    post_norms: bool = False  # the model's CqilConfig.post_norms (Gemma): more lane all-reduces

    def collective_s(self, call: Call) -> float:
        kind, n, nbytes = call
        cost = self.collectives.get((kind, n))
        if cost is None:
            known = ", ".join(f"{k}/{m}" for k, m in sorted(self.collectives)) or "none"
            raise CqilError(f"no cost for {kind} over {n} ranks (known: {known})")
        return cost.seconds(nbytes)

    # -- the contract: which collectives, and which compute, each part of a token has

    def step_collectives(self, group_size: int, bypass_distance: int, world_size: int,
                         batch: int = 1) -> list[Call]:
        """The collectives of one step: a single layer (group_size 1) or a group of P, in the
        engine's order (runtime/distributed_cqil.py: DistributedCqil._step, _post_norm_step)."""
        _check_step(group_size, world_size)
        if world_size == 1:
            return []
        activation = batch * self.hidden_size * self.element_bytes  # one rank's [B, 1, d]
        W, lane = world_size, world_size // group_size
        if group_size == 1:
            return [(ALL_REDUCE, W, activation)] * 2
        final = (ALL_REDUCE, W, activation)  # Σ over all ranks of γ_j ⊙ (a_j + m_j)
        in_lane = (ALL_REDUCE, lane, activation)
        gather = [(ALL_GATHER, W, activation)] if bypass_distance > 0 else []  # every a_k
        if self.post_norms and lane > 1:  # o_j, then f_j, whole inside the lane before its norm
            return [in_lane, *gather, in_lane, final]
        if bypass_distance == 0 and lane > 1:  # the own a_j, whole inside the lane
            return [in_lane, final]
        return [*gather, final]

    def outside_collectives(self, world_size: int, batch: int = 1) -> list[Call]:
        """The embedding's all-reduce and the head's all-gather of the logits."""
        if world_size == 1:
            return []
        rows = -(-self.vocab_size // world_size)
        return [(ALL_REDUCE, world_size, batch * self.hidden_size * self.element_bytes),
                (ALL_GATHER, world_size, batch * rows * self.element_bytes)]

    def step_s(self, group_size: int, bypass_distance: int, world_size: int,
               batch: int = 1) -> float:
        """Seconds of one step: compute on its lanes plus its collectives."""
        calls = self.step_collectives(group_size, bypass_distance, world_size, batch)
        return (self.compute.layer(world_size // group_size)
                + sum(self.collective_s(c) for c in calls))

    def outside_s(self, world_size: int, batch: int = 1) -> float:
        """Seconds of a token outside the layers: embedding, head, their collectives, overhead."""
        calls = self.outside_collectives(world_size, batch)
        return (self.compute.embed_s + self.compute.head(world_size) + self.compute.overhead_s
                + sum(self.collective_s(c) for c in calls))

    # -- predictions

    def predict_token_s(self, groups: Sequence[Sequence[int]], bypass_distance: int,
                        world_size: int, batch: int = 1) -> TokenLatency:
        """Decode seconds per token of `groups` (the converted model's steps; a list of one is a
        single layer) with bypass distance D on W ranks, and the breakdown."""
        if not groups or any(len(g) == 0 for g in groups):
            raise CqilError("groups must be a non-empty list of non-empty steps")
        W = world_size
        compute = self.compute.embed_s + self.compute.head(W) + self.compute.overhead_s
        calls = self.outside_collectives(W, batch)
        for g in groups:
            compute += self.compute.layer(_lane(len(g), W))
            calls += self.step_collectives(len(g), bypass_distance, W, batch)
        collective = sum(self.collective_s(c) for c in calls)
        counts: dict[str, int] = {}
        for kind, n, _ in calls:
            counts[f"{kind}/{n}"] = counts.get(f"{kind}/{n}", 0) + 1
        return TokenLatency(compute + collective, compute, collective, len(calls), counts,
                            len(groups))

    def tensor_parallel_token_s(self, num_layers: int, world_size: int,
                                batch: int = 1) -> TokenLatency:
        """The plain model under tensor parallelism on the same W: every layer its own step."""
        return self.predict_token_s([[i] for i in range(num_layers)], 0, world_size, batch)

    def ratio(self, groups: Sequence[Sequence[int]], bypass_distance: int, world_size: int,
              batch: int = 1) -> float:
        """Predicted decode time of `groups` over the plain model's TP on the same W ranks."""
        num_layers = sum(len(g) for g in groups)
        return (self.predict_token_s(groups, bypass_distance, world_size, batch).seconds
                / self.tensor_parallel_token_s(num_layers, world_size, batch).seconds)

    def predicted_record(self, groups: Sequence[Sequence[int]], bypass_distance: int,
                         world_sizes: Iterable[int], batch: int = 1) -> dict:
        """Plain JSON for the manifest's `predicted` record: per W (as a string key) the
        predicted decode ms per token of the grouping and of the plain model's TP, their ratio
        and the breakdown; and the model's inputs."""
        num_layers = sum(len(g) for g in groups)
        by_w = {}
        for w in world_sizes:
            ours = self.predict_token_s(groups, bypass_distance, w, batch)
            tp = self.tensor_parallel_token_s(num_layers, w, batch)
            by_w[str(w)] = {"decode_ms_per_token": ours.seconds * 1e3,
                            "tensor_parallel_ms_per_token": tp.seconds * 1e3,
                            "ratio": ours.seconds / tp.seconds,
                            "breakdown": ours.to_json(), "tensor_parallel": tp.to_json()}
        return {"engine": "distributed (alpha-beta model)", "batch": batch,
                "by_world_size": by_w, "model": self.to_json()}

    # -- JSON

    def to_json(self) -> dict:
        c = self.compute
        return {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "element_bytes": self.element_bytes, "source": self.source,
                "post_norms": self.post_norms,
                "compute": {"layer_s": {str(t): s for t, s in sorted(c.layer_s.items())},
                            "head_s": {str(w): s for w, s in sorted(c.head_s.items())},
                            "embed_s": c.embed_s, "overhead_s": c.overhead_s},
                "collectives": [asdict(v) for _, v in sorted(self.collectives.items())]}

    @classmethod
    def from_json(cls, data: dict, source: str = "the parallel latency model") -> ParallelLatencyModel:
        try:
            c = data["compute"]
            compute = ComputeCost({int(t): float(s) for t, s in c["layer_s"].items()},
                                  {int(w): float(s) for w, s in c["head_s"].items()},
                                  float(c["embed_s"]), float(c["overhead_s"]))
            costs = [CollectiveCost(x["kind"], int(x["n_ranks"]), float(x["alpha_s"]),
                                    float(x["beta_s_per_byte"])) for x in data["collectives"]]
            return cls(int(data["hidden_size"]), int(data["vocab_size"]),
                       float(data["element_bytes"]), compute, collectives_by_key(costs),
                       str(data.get("source", "")), bool(data.get("post_norms", False)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CqilError(f"{source}: not a parallel latency model ({exc!r})") from exc


def collectives_by_key(costs: Iterable[CollectiveCost]) -> dict[tuple[str, int], CollectiveCost]:
    """{(kind, n_ranks): cost}; a (kind, n) given twice is an error."""
    out: dict[tuple[str, int], CollectiveCost] = {}
    for cost in costs:
        key = (cost.kind, cost.n_ranks)
        if key in out:
            raise CqilError(f"two costs for {cost.kind} over {cost.n_ranks} ranks")
        out[key] = cost
    return out


def _check_step(group_size: int, world_size: int) -> None:
    if world_size < 1 or group_size < 1:
        raise CqilError(f"bad step of {group_size} layers on {world_size} ranks")
    if world_size % group_size:
        raise CqilError(f"a group of {group_size} layers needs a number of ranks it divides; "
                        f"{world_size} ranks cannot run it (docs/runtime.md#distributed-engine)")


def _lane(group_size: int, world_size: int) -> int:
    _check_step(group_size, world_size)
    return world_size // group_size


# ----------------------------------------------------------------------------- search hook


def search_latency(model: ParallelLatencyModel, num_layers: int, world_size: int,
                   bypass_distance: int, max_group_size: int | None = None, batch: int = 1):
    """The LatencyModel (search/latency_model.py) that convert/choose.py's search reads,
    predicted for W ranks of the distributed engine instead of measured on one device.

    step_ms[s]: one step of s layers on W ranks (s = 1: a single layer tensor-parallel over W;
    s > 1: a group on lanes of W/s ranks, with its collectives), for every s ≤ max_group_size
    (default W) that divides W, so the search never forms a group the engine cannot run;
    outside_ms: embedding, head and their collectives; original_ms: the plain model under TP on
    the same W. A budget fraction of original_ms is thus a fraction of the original's TP
    latency on W ranks, and predict_ms(steps) equals predict_token_s(steps, ...) in ms.
    """
    from .latency_model import LatencyModel  # imports torch: only convert calls this

    largest = world_size if max_group_size is None else min(max_group_size, world_size)
    step_ms = {s: model.step_s(s, bypass_distance, world_size, batch) * 1e3
               for s in divisors(world_size) if s <= largest}
    outside_ms = model.outside_s(world_size, batch) * 1e3
    return LatencyModel(outside_ms=outside_ms, step_ms=step_ms,
                        original_ms=outside_ms + num_layers * step_ms[1], num_layers=num_layers,
                        device=f"{world_size} ranks, distributed engine (predicted: "
                               f"{model.source or 'alpha-beta model'})",
                        dtype=f"{model.element_bytes:g}-byte elements")


__all__ = ["ALL_REDUCE", "ALL_GATHER", "KINDS", "CollectiveCost", "ComputeCost",
           "from_weight_bytes", "divisors", "DecoderShape", "TokenLatency",
           "ParallelLatencyModel", "collectives_by_key", "search_latency"]
