"""Decode latency of a grouping, predicted from a few measurements on the target device.

A converted model's decode step costs  O + Σ_steps t(|step|):  O outside the layers (embedding,
final norm, LM head, the loop), t(1) one sequential layer, t(s) one fused group of s layers
(more than t(1), less than s·t(1)). cqil measures them with its own engine, batch 1:
  - O: the embedding + final norm + head of one token, median of repeats;
  - T(1): the model with every layer single  ->  t(1) = (T(1) − O) / N;
  - T(s): the model with as many groups of s as fit  ->  t(s) = (T(s) − O − singles·t(1)) / k.
Budgets and predicted ratios are relative to T(1): the original model on the same engine and
device, so they measure what the grouping gains, not what the engine gains. With a weight
scheme (convert --weights) every variant's linears are quantized as the output's will be
(round to nearest: a decode step's time does not depend on the codes), so a budget is a
fraction of the quantized original's latency, whose steps cost less against the same edges.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..core.devices import release_freed_memory, synchronize


@dataclass
class LatencyModel:
    outside_ms: float
    step_ms: dict[int, float]  # group size -> ms per decode step
    original_ms: float  # T(1): every layer single, whole model
    num_layers: int
    device: str
    dtype: str
    weights: str | None = None  # int8 | int4: the linears' format the variants were timed in

    def predict_ms(self, groups: list[list[int]]) -> float:
        return self.outside_ms + sum(self.step_ms[len(g)] for g in groups)

    def ratio(self, groups: list[list[int]]) -> float:
        return self.predict_ms(groups) / self.original_ms

    def to_json(self) -> dict:
        data = asdict(self)
        data["step_ms"] = {str(k): v for k, v in self.step_ms.items()}
        return data


WARMUP_STEPS = 2  # decode steps of each run that are not timed (first use of buffers)


def decode_ms(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Median decode ms per token of a CqilForCausalLM on cqil's fast path: `repeats` runs of
    a prefill and new_tokens + WARMUP_STEPS decode steps, the first WARMUP_STEPS of each not
    timed (one prefill per run: on a slow device the prefill is most of the cost)."""
    from ..runtime.fastgen import FastGenerator

    generator = FastGenerator(model)
    per_step = []
    for _ in range(repeats):
        run = generator.generate(prompt, max_new_tokens=new_tokens + WARMUP_STEPS + 1)
        per_step.extend(run.decode_s[WARMUP_STEPS:])
    return statistics.median(per_step) * 1e3


@torch.no_grad()
def _outside_ms(model, prompt: torch.Tensor, repeats: int = 50) -> float:
    from ..runtime.quant_cqil import is_quantized

    inner = model.model
    head = model.lm_head.kernel() if is_quantized(model.lm_head) else model.lm_head  # fastgen's
    token = prompt[:, -1:]
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        h = inner.norm(inner.embed_tokens(token))
        head(h[:, -1]).argmax(-1)
        synchronize(h.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]) * 1e3


def _contiguous_again(base_model) -> None:
    """Fast generation re-lays the head out in place (fp32 on CPU: runtime/fastgen.py), and a
    variant's head is the base's own parameter: give it back its ordinary layout, which saving
    (save_pretrained of a pruned copy) and every other user of the base expect."""
    with torch.no_grad():
        for p in base_model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()


def _quantized_variant(model, weights) -> None:
    """The variant's linears in the scheme's format, round to nearest (see module doc); its
    head becomes its own quantized copy, the base's stays as it is."""
    from ..runtime.quant_cqil import swap_linears

    swap_linears(model, weights)
    model.config.weights = weights.to_json()
    model.cqil_refresh_fused()


def measure_latency_model(base_model, max_group_size: int, prompt_len: int = 128,
                          new_tokens: int = 24, repeats: int = 3,
                          on_progress=None, weights=None) -> LatencyModel:
    """Measure O, t(1)..t(max_group_size) on the base model's device and dtype (see module
    doc); max_group_size is the largest group the search may form; weights: a
    quant_cqil.WeightScheme to time the variants in (None: the base's dtype)."""
    from ..runtime.checkpoint import build_cqil_model

    param = next(base_model.parameters())
    n = base_model.config.num_hidden_layers
    vocab = base_model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(param.device)
    variants = {1: [[i] for i in range(n)]}
    for s in range(2, max_group_size + 1):
        if s > n:
            break
        k = (n - 2) // s  # keep the first and the last layer single, like real groupings
        first = 1 if k >= 1 else 0  # a model too shallow for that: one group from layer 0
        k = max(k, 1)
        variants[s] = [[i] for i in range(first)] + \
            [list(range(first + j * s, first + (j + 1) * s)) for j in range(k)] + \
            [[i] for i in range(first + k * s, n)]
    # One converted copy of the layers at a time beside the base model (the embedding, head and
    # final norm are the base's own; the layers are copied: the fused layout is the stored
    # one), rebuilt every repeat so that the variants are still
    # interleaved and drift hits them alike. A build is a copy, cheap next to a timed run.
    totals: dict[int, list[float]] = {s: [] for s in variants}
    outside = None
    for _ in range(repeats):
        for s, groups in variants.items():
            model = build_cqil_model(base_model, groups, 0, share_outside_layers=True,
                                     packed=True)
            if weights is not None:
                _quantized_variant(model, weights)
            totals[s].append(decode_ms(model, prompt, new_tokens, 1))
            if outside is None:
                outside = _outside_ms(model, prompt)
            del model
            _contiguous_again(base_model)
            release_freed_memory()  # else the next variant's copy comes on top of this one's
            if on_progress:
                on_progress()
    total = {s: statistics.median(v) for s, v in totals.items()}
    outside = min(outside, 0.5 * total[1])
    t1 = (total[1] - outside) / n
    step = {1: t1}
    for s, groups in variants.items():
        if s == 1:
            continue
        k = sum(1 for g in groups if len(g) == s)
        singles = len(groups) - k
        step[s] = max(t1, (total[s] - outside - singles * t1) / k)
    return LatencyModel(outside, step, total[1], n, str(param.device),
                        str(param.dtype).replace("torch.", ""),
                        weights.format if weights is not None else None)
