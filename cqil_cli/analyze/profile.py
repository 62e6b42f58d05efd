"""`cqil analyze`: where a model has quasi-independent layers, what they cost, what grouping
them would lose. The report (schema `cqil.analyze/1`, docs/analyze.md) feeds `cqil convert`.

Three measurements, all on calibration text:
  similarity   cosine between the inputs of layers i and j (0 < j−i ≤ W), per token, averaged;
               the angular distance arccos(cos)/π; each layer's block influence 1 − cos(in, out)
  latency      each layer's time for a prefill of L tokens and for one decode step with a cache
               of L tokens (median of repeats), and the time spent outside the layers
  sensitivity  for each run of 2..W adjacent layers made concurrent on its own (docs/method.md, no
               bypass): its local error, ‖y − x_{e+1}‖² / ‖x_{e+1}‖² per token at the group's own
               output (linear in layers × W); with exact_kl also KL(original ‖ grouped) per
               token at the model's output and the change of next-token loss (the rest of the
               model after every candidate: quadratic in layers)
Batches stream through, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from .. import __version__
from ..core.devices import synchronize
from ..core.documents import Schema
from ..core.metrics import log_probs, next_token_nll, perplexity_of, token_kl
from .options import AnalyzeOptions, check_window
from .probes import LayerProxy, cache_kwargs, find_decoder_layers, hidden_out, proxied_layers

SCHEMA = Schema("cqil.analyze", 2, "a `cqil analyze --json` report", "run `cqil analyze` again",
                oldest=1)  # 1: every group measured by its KL at the output, no local_error


@dataclass
class AnalyzeReport:
    """The `cqil analyze` report (schema cqil.analyze/1; every field in docs/analyze.md).

    similarity / angular_distance: N x N, None beyond the window; block_influence: N;
    latency_ms: per-layer prefill and decode ms and totals (None with --no-latency);
    groups: one row per candidate group (layers, size, local_error, kl, delta_loss, cost,
    cost_per_saved_step, kl_per_saved_step, mean_similarity), lowest cost per saved step first;
    sensitivity_measure: what `cost` is, "local_error" or "output_kl" (None: not measured).
    """

    cqil_version: str
    model: str
    model_name: str
    model_type: str
    num_layers: int
    device: str
    dtype: str
    calibration: dict | None  # text spec, samples, seq_len, seed (set by the caller)
    window: int
    tokens: int
    loss: float
    ppl: float
    similarity: list[list[float | None]]
    angular_distance: list[list[float | None]]
    block_influence: list[float]
    latency_ms: dict | None
    groups: list[dict]
    options: dict
    sensitivity_measure: str | None = None

    def to_json(self) -> dict:
        return {"schema": SCHEMA.tag, **asdict(self)}

    @classmethod
    def from_json(cls, data: object, source: str) -> AnalyzeReport:
        data = SCHEMA.check(data, source)
        if data["schema"] == "cqil.analyze/1":  # every group measured at the output
            data = {**data, "sensitivity_measure": "output_kl" if data.get("groups") else None}
        names = tuple(f.name for f in fields(cls))
        SCHEMA.require(data, names, source)
        return cls(**{k: data[k] for k in names})

    def group_costs(self, max_group_size: int) -> dict[tuple[int, ...], float]:
        """The cost (sensitivity_measure) of each measured group of at most max_group_size
        layers, by its layer tuple; a version-1 report's rows have only `kl`."""
        return {tuple(g["layers"]): group_cost(g) for g in self.groups
                if g["size"] <= max_group_size}


def group_cost(row: dict) -> float:
    """A report row's cost (its sensitivity_measure); a version-1 row has only `kl`."""
    return float(row.get("cost", row["kl"]))


def candidate_groups(num_layers: int, window: int) -> list[list[int]]:
    """Every run of 2..window adjacent layers, by size then start."""
    return [list(range(start, start + size))
            for size in range(2, window + 1)
            for start in range(0, num_layers - size + 1)]


def _token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, T, H] × [B, T, H] -> [B, T] cosine per token, in fp32."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


@torch.no_grad()
def analyze_model(loaded, samples: torch.Tensor, options: AnalyzeOptions,
                  advance: Callable[[str], None] | None = None) -> AnalyzeReport:
    """Run the three measurements on `samples` ([num_samples, L] token ids); returns the report."""
    model = loaded.model
    num_layers = len(_layers_of(model))
    check_window(options.window, num_layers)
    advance = advance or (lambda _label: None)
    device = next(model.parameters()).device
    groups = candidate_groups(num_layers, options.window) if options.sensitivity else []

    # Running sums over tokens; each entry becomes a mean at the end.
    sim_sum = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    ang_sum = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    influence_sum = torch.zeros(num_layers, dtype=torch.float64)
    local_sum = torch.zeros(len(groups), dtype=torch.float64)
    kl_sum = torch.zeros(len(groups), dtype=torch.float64)
    loss_delta_sum = torch.zeros(len(groups), dtype=torch.float64)
    loss_sum, tokens, predicted_tokens = 0.0, 0, 0

    with proxied_layers(model) as proxies:
        for batch in samples.split(options.batch_size):
            ids = batch.to(device)
            # 1. The original model, recording every layer's input, call and output.
            for p in proxies:
                p.mode, p.record_input = "run", True
            logits = model(input_ids=ids, use_cache=False).logits
            log_p = log_probs(logits)  # [B, T, V]
            del logits
            nll = next_token_nll(log_p, ids)  # [B, T-1]
            loss_sum += nll.sum().item()
            inputs = [p.recorded_input for p in proxies] + [hidden_out(proxies[-1].recorded_output)]
            for i in range(num_layers):
                influence_sum[i] += (1 - _token_cosine(inputs[i], inputs[i + 1])).sum().item()
                for j in range(i + 1, min(num_layers, i + options.window + 1)):
                    cos = _token_cosine(inputs[i], inputs[j])
                    sim_sum[i, j] += cos.sum().item()
                    ang_sum[i, j] += (torch.arccos(cos.clamp(-1, 1)) / math.pi).sum().item()
            tokens += ids.numel()
            predicted_tokens += nll.numel()
            for p in proxies:
                p.record_input = False
            advance("similarity")

            # 2. Each candidate group alone made concurrent: its error at its own output, and
            # with exact_kl the KL at the model's output (resuming after its last layer).
            if groups:
                local, kl, delta = group_sensitivity(model, proxies, ids, inputs, log_p, nll,
                                                     options.window, advance,
                                                     exact=options.exact_kl)
                for g, group in enumerate(groups):
                    local_sum[g] += local[tuple(group)]
                    if options.exact_kl:
                        kl_sum[g] += kl[tuple(group)]
                        loss_delta_sum[g] += delta[tuple(group)]
            for p in proxies:
                p.reset()
            del inputs, log_p

        latency = (_measure_latency(model, proxies, samples[:1].to(device), options.repeats,
                                    advance) if options.latency else None)

    similarity = _matrix(sim_sum / max(tokens, 1), options.window, diagonal=1.0)
    angular = _matrix(ang_sum / max(tokens, 1), options.window, diagonal=0.0)
    group_rows = []
    for g, group in enumerate(groups):
        local = local_sum[g].item() / tokens
        kl = kl_sum[g].item() / tokens if options.exact_kl else None
        cost = kl if options.exact_kl else local
        pairs = [similarity[a][b] for a in group for b in group if a < b]
        group_rows.append({
            "layers": group,
            "size": len(group),
            "local_error": local,
            "kl": kl,
            "delta_loss": loss_delta_sum[g].item() / predicted_tokens if options.exact_kl
            else None,
            "cost": cost,
            "cost_per_saved_step": cost / (len(group) - 1),
            "kl_per_saved_step": kl / (len(group) - 1) if options.exact_kl else None,
            "mean_similarity": sum(pairs) / len(pairs),
        })
    group_rows.sort(key=lambda row: (row["cost_per_saved_step"], row["layers"]))
    loss = loss_sum / max(predicted_tokens, 1)
    return AnalyzeReport(
        cqil_version=__version__,
        model=loaded.spec,
        model_name=loaded.name,
        model_type=loaded.model_type,
        num_layers=num_layers,
        device=str(device),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        calibration=None,  # filled in by the caller, who knows the text spec
        window=options.window,
        tokens=tokens,
        loss=loss,
        ppl=perplexity_of(loss),
        similarity=similarity,
        angular_distance=angular,
        block_influence=(influence_sum / max(tokens, 1)).tolist(),
        latency_ms=latency,
        groups=group_rows,
        options=asdict(options),
        sensitivity_measure=("output_kl" if options.exact_kl else "local_error") if groups
        else None,
    )


STACK_ROWS = 8  # candidates sharing a last layer run the rest of the model up to this many
# windows at a time (stacked along the batch): fewer, larger forwards; memory ~ rows × L × vocab


def group_sensitivity(model, proxies: list[LayerProxy], ids: torch.Tensor,
                      inputs: list[torch.Tensor], log_p: torch.Tensor, nll: torch.Tensor,
                      window: int, advance: Callable[[str], None] = lambda _label: None,
                      stack_rows: int = STACK_ROWS, exact: bool = True
                      ) -> tuple[dict, dict, dict]:
    """For every candidate group of 2..window adjacent layers made concurrent on its own,
    summed over the batch's tokens: its local error and, when `exact`, KL(original ‖ grouped)
    at the model's output and the next-token NLL change.

    ids [B, T]; inputs: the recorded x_0..x_N [B, T, H] (x_ℓ the input of layer ℓ, x_N the last
    output), each proxy holding its recorded call and output; log_p [B, T, V], nll [B, T−1] of
    the original. Returns ({group layers tuple: Σ local error}, {…: Σ KL}, {…: Σ NLL change});
    the last two are empty unless `exact`.

    Only what a group changes is computed. Its output y = x_s + Σ_{j=s..e} (layer_j(x_s) − x_s)
    (docs/method.md, no bypass) needs layer_j(x_s) for j > s only (layer_s(x_s) = x_{s+1} is
    recorded), and groups with the same start share those: each (start, layer) pair runs once,
    (W − 1)·N layer calls per batch. The local error of a group s..e is, per token,
    ‖y − x_{e+1}‖² / ‖x_{e+1}‖²: how far the group moves the residual stream the next layer
    reads, relative to its size (what that layer's RMSNorm sees). The exact KL needs the rest of
    the model after each group: layers before it are never rerun, the model's forward replays y
    up to the group's last layer e and runs e+1..N−1, the final norm and the head, for all
    groups ending at e at once (stacked along the batch, stack_rows windows at most): (W − 1)·N
    candidates × (about N/2 layers + the head), quadratic in N.
    """
    num_layers, batch = len(proxies), ids.shape[0]
    per_forward = max(1, stack_rows // batch)
    local_sums: dict[tuple[int, ...], float] = {}
    kl_sums: dict[tuple[int, ...], float] = {}
    delta_sums: dict[tuple[int, ...], float] = {}
    delta_acc: dict[int, torch.Tensor] = {}  # start s -> Σ_{j=s..e} (layer_j(x_s) − x_s), [B, T, H]
    for end in range(1, num_layers):
        starts = list(range(end - 1, max(end - window, -1), -1))  # groups s..end, 2..W layers
        target = inputs[end + 1].float()  # x_{e+1} [B, T, H]: the sequential output
        target_energy = target.square().sum(-1).clamp_min(1e-12)  # [B, T]
        outputs = []  # y of each group s..end, [B, T, H]
        for s in starts:
            x = inputs[s]
            if s == end - 1:
                delta_acc[s] = torch.zeros_like(x)
                delta_acc[s] += inputs[s + 1] - x
            delta_acc[s] += proxies[end].call_on(x) - x
            y = x + delta_acc[s]
            error = (y.float() - target).square().sum(-1) / target_energy  # [B, T]
            local_sums[tuple(range(s, end + 1))] = float(error.sum(dtype=torch.float64))
            if exact:
                outputs.append(y)
            else:
                advance("sensitivity")
        delta_acc.pop(end - window + 1, None)  # its largest group (W layers) ends here
        for first in range(0, len(outputs), per_forward):
            chunk = outputs[first:first + per_forward]
            count = len(chunk)
            stacked = torch.cat(chunk) if count > 1 else chunk[0]  # [count·B, T, H]
            for k, proxy in enumerate(proxies):
                if k <= end:
                    proxy.replay_with(stacked)
                else:
                    proxy.mode = "run"
            rows = ids.repeat(count, 1)  # [count·B, T]
            log_q = log_probs(model(input_ids=rows, use_cache=False).logits)  # [count·B, T, V]
            kl = token_kl(log_p, log_q.view(count, *log_p.shape)).sum((1, 2))  # [count]
            delta = (next_token_nll(log_q, rows).view(count, *nll.shape) - nll).sum((1, 2))
            del log_q, stacked
            for c, s in enumerate(starts[first:first + per_forward]):
                group = tuple(range(s, end + 1))
                kl_sums[group], delta_sums[group] = kl[c].item(), delta[c].item()
                advance("sensitivity")
        del outputs
    return local_sums, kl_sums, delta_sums


def _layers_of(model):
    parent, attr, _ = find_decoder_layers(model)
    return getattr(parent, attr)


def _matrix(values: torch.Tensor, window: int, diagonal: float) -> list[list[float | None]]:
    """N×N list, symmetric, None where |i−j| > window."""
    n = values.shape[0]
    out: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        out[i][i] = diagonal
        for j in range(i + 1, min(n, i + window + 1)):
            out[i][j] = out[j][i] = float(values[i, j])
    return out


def _measure_latency(model, proxies: list[LayerProxy], prompt: torch.Tensor, repeats: int,
                     advance: Callable[[str], None]) -> dict:
    """Per-layer time of a prefill of the prompt ([1, L]) and of one decode step after it."""
    device = prompt.device
    prefill_layers = [[] for _ in proxies]
    decode_layers = [[] for _ in proxies]
    prefill_total, decode_total = [], []
    for rep in range(repeats + 1):  # repetition 0 is the warm-up, measured and thrown away
        for p, timer in zip(proxies, prefill_layers, strict=True):
            p.timer = timer
        synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        synchronize(device)
        prefill_total.append(time.perf_counter() - start)
        next_token = out.logits[:, -1:].argmax(-1)
        for p, timer in zip(proxies, decode_layers, strict=True):
            p.timer = timer
        synchronize(device)
        start = time.perf_counter()
        model(input_ids=next_token, use_cache=True, **cache_kwargs(model, out))
        synchronize(device)
        decode_total.append(time.perf_counter() - start)
        if rep == 0:
            for timer in prefill_layers + decode_layers:
                timer.clear()
            prefill_total.clear()
            decode_total.clear()
        advance("latency")
    for p in proxies:
        p.timer = None

    def ms(values):
        return statistics.median(values) * 1e3

    prefill = [ms(t) for t in prefill_layers]
    decode = [ms(t) for t in decode_layers]
    # Outside the layers: per repeat, total minus the layers' sum, then the median.
    prefill_out = [tot - sum(t[r] for t in prefill_layers) for r, tot in enumerate(prefill_total)]
    decode_out = [tot - sum(t[r] for t in decode_layers) for r, tot in enumerate(decode_total)]
    return {
        "prefill": prefill,
        "decode": decode,
        "prefill_outside_layers": ms(prefill_out),
        "decode_outside_layers": ms(decode_out),
        "prefill_total": ms(prefill_total),
        "decode_total": ms(decode_total),
        "prompt_tokens": int(prompt.shape[1]),
        "batch": int(prompt.shape[0]),
        "repeats": repeats,
    }


def progress_steps(num_samples: int, options: AnalyzeOptions, num_layers: int) -> int:
    batches = math.ceil(num_samples / options.batch_size)
    groups = len(candidate_groups(num_layers, options.window)) if options.sensitivity else 0
    return batches * (1 + groups) + ((options.repeats + 1) if options.latency else 0)
