"""Local (block-wise) reconstruction: the tuning stage before the end-to-end distillation.

Post-training quantization and layer pruning recover faster when each changed block is first
trained to reproduce the original's output on cached activations, block after block, each fed
the activations of the model repaired so far (BRECQ, OmniQuant, AutoRound; the first stage of
EfficientQAT; LLM-Streamline): a local step runs the one or two layers of a block, not all of
them. The end-to-end KL stage of calibrate/tuning.py then tunes what the blocks do together.

A *block* is what a strategy changed, and the original layers it stands for:
  cqil   a group (its layers, β and γ)      <-> its layers run in sequence;
  skip   a kept layer after a skipped run   <-> that run and the layer, every token through
         (the skipping model on a prompt and     every layer (cqil_blocks / skip_blocks run
         a continuation)                         on the runtime's prepare_steps / run_steps);
  prune  a kept layer after a removed run   <-> that run and the layer in the original model
         (before it, for a run at the end)       kept in memory (prune_blocks replays the
                                                 transformers layers with their own arguments).
For each block in order, on n calibration windows of T tokens (options.samples, or with a time
bound as many as caching fits in options.cache_share of it, as timed on the first batch):
  x  [n, T, d]  its input, from the model repaired so far (the blocks before it trained);
  y  [n, T, d]  the original layers' sequential output from that same x, cached BEFORE the
                block trains: so full-weight training needs no second copy of the model, only a
                copy of the block's own weights (kept in LocalResult.saved, a file, until the
                caller decides to keep the stage);
  and the block's parameters (every weight of its layers, or LoRA; plus β and γ) are trained
  to map x to y, minimising
    nmse      ‖s − y‖² / ‖y − x‖²: the squared error relative to the energy of the original
              block's residual-stream delta (blocks of any depth or scale weigh alike), or
    cos-nmse  nmse + the mean over tokens of 1 − cos(s − x, y − x);
  s being the block's output. A closed-form start comes first (options.closed_form): the block's
  output is linear in the down projections of its layers' MLPs (y = … + Σ_j γ_j ⊙ W_j u_j), so
  ridge least squares on the cached u_j [n·T, P·I] gives their correction at once (ReplaceMe,
  Shopkhoev et al. 2025, does the same for a pruned block). Each block then keeps the best of
  its states by its error on the cache: as it was, after that start, after training.
Bounds: `steps` optimizer steps per block and `minutes` for the whole stage, caching included,
shared evenly between the blocks still to train.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.devices import release_freed_memory
from ..core.errors import CqilError
from .options import LOCAL_LOSSES, LOCAL_PARAMS, LocalOptions
from .precision import fp32_linears, resolve_precision
from .tuning import ParameterBackup, attach_lora_to, detach_lora, random_batches

MAX_CLOSED_FORM_FEATURES = 8192  # P·I above this: the Gram matrix would be too large to solve


@dataclass
class Block:
    name: str  # e.g. "layers 12-13"
    layers: list[nn.Module]  # the layers whose weights train (or carry LoRA)
    student: Callable[[torch.Tensor], torch.Tensor]  # x [b, T, d] -> s [b, T, d], differentiable
    original: Callable[[torch.Tensor], torch.Tensor]  # x -> y, the original layers in sequence
    after: Callable[[torch.Tensor], torch.Tensor]  # s -> the next block's input (layers between)
    passes: int = 0  # layers run by original, student and after together (one window each)


@dataclass
class Blocks:
    model: nn.Module  # the model the blocks train; all else in it stays frozen
    first_input: Callable[[torch.Tensor], torch.Tensor]  # ids [b, T] -> the first block's x
    blocks: list[Block]
    prefix: int = 0  # layers first_input runs

    def layer_passes(self) -> int:
        """Layers the stage runs per cached window without gradients, roughly: the prefix, and
        for each block its passes plus two more of its own layers (the error and the end pass)
        plus about as much again for the closed form's Gram matrix."""
        return self.prefix + sum(b.passes + 3 * len(b.layers) for b in self.blocks)


@dataclass
class LocalResult:
    steps: int = 0
    seconds: float = 0.0
    blocks: list[dict] = field(default_factory=list)  # per block: name, steps, losses, …
    precision: str = "fp32"
    samples: int = 0  # windows cached
    saved: ParameterBackup | None = None  # the weights the stage changed, as they were (disk)

    @property
    def loss_start(self) -> float | None:
        """Mean over the blocks of their error on the cache (nmse) before the stage."""
        return _mean([b["loss_start"] for b in self.blocks])

    @property
    def loss_end(self) -> float | None:
        """… and after it."""
        return _mean([b["loss_end"] for b in self.blocks])


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@torch.no_grad()
def restore(result: LocalResult) -> None:
    """Put back every weight the stage changed (the caller did not keep it)."""
    if result.saved is not None:
        result.saved.restore()
        result.saved.close()
        result.saved = None


def block_loss(s: torch.Tensor, y: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The reconstruction loss of a block (module docstring) on [b, T, d] tensors, fp32."""
    s, y, x = s.float(), y.float(), x.float()
    delta = y - x  # the original block's change of the residual stream
    loss = (s - y).pow(2).sum() / delta.pow(2).sum().clamp_min(1e-30)
    if kind == "cos-nmse":
        loss = loss + (1 - F.cosine_similarity(s - x, delta, dim=-1)).mean()
    return loss


def reconstruct(blocks: Blocks, calib_ids: torch.Tensor, options: LocalOptions,
                on_step: Callable[[int, int, float, float], None] | None = None,
                on_block: Callable[[int, dict], None] | None = None) -> LocalResult:
    """Train every block of `blocks` in order (module docstring) on the first options.samples
    windows of calib_ids [n, T]. Changes the model in place; LoRA (params "lora") is merged
    into the weights after each block. The weights it changed are in result.saved: pass the
    result to restore() to undo the stage. on_step(block, step, loss, elapsed seconds) is
    called after every optimizer step, on_block(block, its record) after every block.

    Each block keeps the best of three states by its error on the cache (nmse): as it was, after
    the closed-form start, after training; so a block never leaves the stage worse on the data
    it was fitted to.
    """
    if options.params not in LOCAL_PARAMS:
        raise CqilError(f"unknown local parameters '{options.params}' ({', '.join(LOCAL_PARAMS)})")
    if options.loss not in LOCAL_LOSSES:
        raise CqilError(f"unknown local loss '{options.loss}' ({', '.join(LOCAL_LOSSES)})")
    if options.steps is None and options.minutes is None:
        raise CqilError("the local stage needs a bound: a number of steps or of minutes")
    model = blocks.model
    device = next(model.parameters()).device
    result = LocalResult(precision=resolve_precision(options.precision, device))
    start = time.perf_counter()
    deadline = start + options.minutes * 60 if options.minutes is not None else math.inf
    for p in model.parameters():
        p.requires_grad_(False)
    if not blocks.blocks:
        return result
    torch.manual_seed(options.seed)  # LoRA initialisation
    with fp32_linears(result.precision, model):  # caching, closed form and training alike
        _reconstruct_blocks(blocks, calib_ids[:options.samples].to(device), options, result,
                            deadline, on_step, on_block)
    result.seconds = time.perf_counter() - start
    return result


def _reconstruct_blocks(blocks: Blocks, ids: torch.Tensor, options: LocalOptions,
                        result: LocalResult, deadline: float, on_step, on_block) -> None:
    """reconstruct's loop over the blocks, filling `result`."""
    with torch.no_grad():
        x = _first_inputs(blocks, ids, options, deadline)  # [n, T, d]
    result.samples = x.shape[0]
    caching = None  # seconds a block spends outside training: targets, passes, layers after
    for k, block in enumerate(blocks.blocks):
        if time.perf_counter() >= deadline:
            break  # the blocks left stay as they are
        began = time.perf_counter()
        with torch.no_grad():
            y = _batched(block.original, x, options.cache_batch)  # [n, T, d]
        originals = [p.detach().to("cpu", copy=True) for p in _parameters(block)]  # this block's
        if result.saved is None:  # … and every block's, on disk until the caller decides
            result.saved = ParameterBackup()
        result.saved.add(_parameters(block))
        record = {"name": block.name, "steps": 0}
        record["loss_start"], ready, record["closed_form"] = \
            _closed_form_start(block, x, y, options)
        overhead = time.perf_counter() - began
        left = len(blocks.blocks) - k  # this block's share of the time, after the caching of
        reserve = (caching if caching is not None else 2 * overhead) * (left - 1)  # the rest
        budget = max((deadline - time.perf_counter() - reserve) / left, 0.0)
        trained = time.perf_counter()
        outputs = _train_and_settle(block, x, y, originals, ready, options, result, record, k,
                                    trained + budget, on_step)
        after_began = time.perf_counter()
        del originals, y
        if k + 1 < len(blocks.blocks):
            with torch.no_grad():  # the next block's input, over this one's (no longer needed)
                row = 0
                while outputs:
                    s = outputs.pop(0)
                    x[row:row + s.shape[0]] = block.after(s)
                    row += s.shape[0]
        del outputs
        release_freed_memory()  # this block's targets, optimizer state and outputs
        caching = overhead + record.pop("settle_seconds") + (time.perf_counter() - after_began)
        record["seconds"] = round(time.perf_counter() - began, 1)
        result.blocks.append(record)
        if on_block:
            on_block(k, record)


def _train_and_settle(block: Block, x, y, originals: list[torch.Tensor], ready: float | None,
                      options: LocalOptions, result: LocalResult, record: dict, index: int,
                      deadline: float, on_step) -> list[torch.Tensor]:
    """Train the block until the deadline, then keep the best of its three states by the error
    on the cache: as it was (originals), after the closed-form start (its predicted error
    `ready`, None: no start), after training. Returns its outputs on the cache, batch by batch."""
    start_weights = [p.detach().clone() for p in _parameters(block)] if ready is not None \
        else originals
    ready = record["loss_start"] if ready is None else ready
    began = time.perf_counter()
    _train_block(block, x, y, options, result, record, index, deadline, on_step)
    settle = time.perf_counter()
    record["train_seconds"] = round(settle - began, 1)
    outputs, record["loss_end"] = _outputs_and_error(block, x, y, options.cache_batch)
    if record["loss_end"] > min(ready, record["loss_start"]):  # training did not help
        if record["steps"] and ready < record["loss_start"]:  # back to the start, if better
            _load(block, start_weights)
            outputs, record["loss_end"] = _outputs_and_error(block, x, y, options.cache_batch)
            record["kept"] = "start"
        if record["loss_end"] > record["loss_start"]:  # nor did the start: as it was
            _load(block, originals)
            outputs, record["loss_end"] = _outputs_and_error(block, x, y, options.cache_batch)
            record["kept"] = "original"
    record["settle_seconds"] = time.perf_counter() - settle
    return outputs


def _first_inputs(blocks: Blocks, ids: torch.Tensor, options: LocalOptions,
                  deadline: float) -> torch.Tensor:
    """The first block's input x [n, T, d] on n of the windows ids [N, T]: all of them, or
    with a deadline as many as caching fits in options.cache_share of the time left, as timed
    on the first batch (at least one training batch)."""
    began = time.perf_counter()
    first = blocks.first_input(ids[:options.cache_batch])
    count = ids.shape[0]
    if deadline < math.inf and blocks.prefix > 0:
        per_layer = (time.perf_counter() - began) / (first.shape[0] * blocks.prefix)
        fits = options.cache_share * (deadline - began) / (per_layer * blocks.layer_passes())
        least = min(options.batch_size, count)
        count = max(least, min(count, int(fits) // options.batch_size * options.batch_size))
    x = first.new_empty((count, *first.shape[1:]))
    x[:first.shape[0]] = first[:count]
    del first
    for row in range(options.cache_batch, count, options.cache_batch):
        x[row:row + options.cache_batch] = blocks.first_input(
            ids[row:min(row + options.cache_batch, count)])
    return x


def _batched(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             batch_size: int) -> torch.Tensor:
    """run over x [n, T, d] batch by batch, into one preallocated result (a list of outputs
    and their concatenation would hold it twice)."""
    out = torch.empty_like(x)
    for row in range(0, x.shape[0], batch_size):
        out[row:row + batch_size] = run(x[row:row + batch_size])
    return out


def _parameters(block: Block) -> list[nn.Parameter]:
    return [p for layer in block.layers for p in layer.parameters()]


@torch.no_grad()
def _load(block: Block, values: list[torch.Tensor]) -> None:
    for p, value in zip(_parameters(block), values, strict=True):
        p.copy_(value.to(p.device))


@torch.no_grad()
def _outputs_and_error(block: Block, x: torch.Tensor, y: torch.Tensor,
                       batch_size: int) -> tuple[list[torch.Tensor], float]:
    """The block's outputs on the cache x [n, T, d], batch by batch, and its error there:
    Σ‖s − y‖² / Σ‖y − x‖² over every cached token (the nmse of the whole cache)."""
    outputs = [block.student(xb) for xb in x.split(batch_size)]
    error = sum(float((s.float() - yb).pow(2).sum()) for s, yb in
                zip(outputs, y.split(batch_size), strict=True))
    return outputs, error / _energy(x, y)


def _energy(x: torch.Tensor, y: torch.Tensor) -> float:
    """Σ‖y − x‖², the energy of the original blocks' deltas on the cache."""
    return max(sum(float((yb - xb).pow(2).sum()) for xb, yb in
                   zip(x.split(16), y.split(16), strict=True)), 1e-30)


def _train_block(block: Block, x: torch.Tensor, y: torch.Tensor, options: LocalOptions,
                 result: LocalResult, record: dict, index: int, deadline: float,
                 on_step) -> None:
    """AdamW on the block's parameters until options.steps or the deadline; merges LoRA."""
    bypass = [p for layer in block.layers for p in (getattr(layer, "cqil_gamma", None),
                                                   getattr(layer, "cqil_beta", None))
              if p is not None]
    groups = []
    adapters = []
    if options.params == "full":
        ids = {id(p) for p in bypass}
        weights = [p for layer in block.layers for p in layer.parameters() if id(p) not in ids]
        groups.append({"params": weights, "lr": options.lr_full})
    elif options.lora_rank > 0:
        adapters = attach_lora_to(block.layers, options.lora_rank)
        groups.append({"params": [p for a in adapters for p in (a.lora_a, a.lora_b)],
                       "lr": options.lr_lora})
    if bypass:
        groups.append({"params": bypass, "lr": options.lr_bypass})
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    device = x.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=result.precision == "bf16")
    batches = random_batches(torch.arange(x.shape[0]), min(options.batch_size, x.shape[0]),
                             options.seed + index)
    start = time.perf_counter()
    try:
        while (options.steps is None or record["steps"] < options.steps) and \
                time.perf_counter() < deadline:
            rows = next(batches).to(device)
            xb, yb = x[rows], y[rows]
            with autocast:
                loss = block_loss(block.student(xb), yb, xb, options.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            record["steps"] += 1
            result.steps += 1
            if on_step:
                on_step(index, record["steps"], loss.item(), time.perf_counter() - start)
    finally:
        for p in params:  # and no gradient left on them: a block's worth of memory each
            p.requires_grad_(False)
            p.grad = None
        if adapters:
            detach_lora(_Layers(block.layers), merge=True)


class _Layers(nn.Module):
    """A throwaway parent, so detach_lora can walk exactly the block's layers."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


@torch.no_grad()
def _closed_form_start(block: Block, x: torch.Tensor, y: torch.Tensor,
                       options: LocalOptions) -> tuple[float, float | None, str | None]:
    """(the block's error on the cache before the stage, its error after this start or None
    when there was none, what the start did).

    The block's output s is linear in each layer's down projection W_j [d, I]: s changes by
    γ_j ⊙ ΔW_j u_j (γ_j = 1 for a single layer) where u_j [.., I] is that projection's input.
    Stacking U = [u_1 … u_P] [N, P·I] and R = y − s [N, d] over the N cached tokens, the ridge
    solution Δ' = (UᵀU + λI)⁻¹ UᵀR (λ = options.ridge / n × the mean diagonal of UᵀU for n
    windows: a pull towards the current weights of a fixed strength, against fitting the cache
    too closely) gives ΔW_j = Δ'_jᵀ / γ_j, and
    the new error ‖R − UΔ'‖² = ‖R‖² − 2 tr(Δ'ᵀUᵀR) + tr(Δ'ᵀUᵀUΔ') without another pass. (A
    block whose output is not linear in W_j is caught by reconstruct's check afterwards.)
    """
    b = options.cache_batch
    downs = [getattr(getattr(layer, "mlp", None), "down_proj", None) for layer in block.layers]
    usable = options.closed_form and all(type(d) is nn.Linear for d in downs) and \
        sum(d.in_features for d in downs) <= MAX_CLOSED_FORM_FEATURES
    inputs: dict[int, torch.Tensor] = {}
    hooks = [d.register_forward_hook(lambda _m, args, _out, j=j: inputs.__setitem__(j, args[0]))
             for j, d in enumerate(downs)] if usable else []
    # Memory (the stage's peak on a 1-2 layer block): UᵀU in float64 [P·I, P·I], filled block
    # by block [I_j, I_k] from each batch's u_j (never the concatenated U [b·T, P·I], nor a
    # float64 copy of a product), and factored in place.
    sizes = [d.in_features for d in downs] if usable else []
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    gram = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64, device=x.device)
    cross = torch.zeros(sum(sizes), x.shape[-1], dtype=torch.float64, device=x.device)
    error = 0.0
    try:
        for xb, yb in zip(x.split(b), y.split(b), strict=True):
            residual = (yb - block.student(xb).float()).reshape(-1, yb.shape[-1])  # [b·T, d]
            error += float(residual.pow(2).sum())
            u = [inputs[j].reshape(-1, size).float() for j, size in enumerate(sizes)]  # [b·T, I_j]
            for j, (uj, oj) in enumerate(zip(u, offsets, strict=True)):
                cross[oj:oj + sizes[j]] += uj.T @ residual
                for k in range(j, len(u)):  # the upper blocks; the lower are their transposes
                    gram[oj:oj + sizes[j], offsets[k]:offsets[k] + sizes[k]] += uj.T @ u[k]
            del u
            inputs.clear()
    finally:
        for hook in hooks:
            hook.remove()
    energy = _energy(x, y)
    before = error / energy
    if not usable:
        return before, None, None
    for j in range(len(sizes)):
        for k in range(j + 1, len(sizes)):
            gram[offsets[k]:offsets[k] + sizes[k], offsets[j]:offsets[j] + sizes[j]] = \
                gram[offsets[j]:offsets[j] + sizes[j], offsets[k]:offsets[k] + sizes[k]].T
    ridge = float(options.ridge / x.shape[0] * gram.diagonal().mean().clamp_min(1e-30))
    gram.diagonal().add_(ridge)  # symmetric positive definite: Cholesky, in place
    factor, failed = torch.linalg.cholesky_ex(
        gram, out=(gram, torch.empty((), dtype=torch.int32, device=gram.device)))
    if failed:
        return before, None, "skipped (the Gram matrix is not positive definite)"
    solution = torch.cholesky_solve(cross, factor)  # Δ' [P·I, d]
    del factor, gram
    # ‖R − UΔ'‖² = ‖R‖² − 2 tr(Δ'ᵀUᵀR) + tr(Δ'ᵀUᵀUΔ'), and (UᵀU + λI)Δ' = UᵀR makes the last
    # term tr(Δ'ᵀUᵀR) − λ‖Δ'‖²: no need for UᵀU after the factorisation.
    predicted = (error - float((solution * cross).sum())
                 - ridge * float(solution.pow(2).sum())) / energy
    offset = 0
    for layer, down in zip(block.layers, downs, strict=True):
        delta = solution[offset:offset + down.in_features].T  # [d, I]
        offset += down.in_features
        gamma = getattr(layer, "cqil_gamma", None)
        if gamma is not None:
            delta = delta / gamma.double()[:, None]
        down.weight += delta.to(down.weight.dtype)
    return before, predicted, f"least squares (error {before:.4g} -> {predicted:.4g})"


# ----------------------------------------------------------------------------- the blocks


def repair_units(num_layers: int, kept: list[int]) -> list[tuple[int, int, int]]:
    """(start, stop, kept layer) for each kept layer that stands for removed or skipped layers:
    the run right before it, and for the last kept layer also a run after it; [start, stop) is
    the span of original layers it replaces. Kept layers with no such run are not listed."""
    kept_set = set(kept)
    units = []
    for position, layer in enumerate(kept):
        start = layer
        while start > 0 and start - 1 not in kept_set:
            start -= 1
        stop = num_layers if position == len(kept) - 1 else layer + 1
        if (start, stop) != (layer, layer + 1):
            units.append((start, stop, layer))
    return units


def _on_model(model, ids: torch.Tensor) -> torch.Tensor:
    """ids on the model's device (calibration windows are drawn on the CPU)."""
    return ids.to(next(model.parameters()).device)


def cqil_blocks(model, example_ids: torch.Tensor) -> Blocks:
    """The groups of a grouped CqilForCausalLM as blocks: student = the group (reference
    engine), original = its layers in sequence. example_ids [b, T]: the windows' length (every
    batch shares one StepContext: no padding, positions 0..T-1)."""
    inner = model.model
    steps = model.config.groups
    grouped = [s for s, group in enumerate(steps) if len(group) > 1]
    _, context = inner.prepare_steps(_on_model(model, example_ids[:1]))

    def run(first: int, stop: int, sequential: bool = False):
        return lambda x: inner.run_steps(x, context, steps=range(first, stop),
                                         sequential=sequential)

    def first_input(ids):
        x, _ = inner.prepare_steps(ids)
        return inner.run_steps(x, context, steps=range(grouped[0] if grouped else 0))

    blocks = []
    for k, s in enumerate(grouped):
        following = grouped[k + 1] if k + 1 < len(grouped) else len(steps)
        between = sum(len(steps[t]) for t in range(s + 1, following))
        blocks.append(Block(f"layers {steps[s][0]}-{steps[s][-1]}", inner.step_layers(s),
                            student=run(s, s + 1), original=run(s, s + 1, sequential=True),
                            after=run(s + 1, following), passes=2 * len(steps[s]) + between))
    return Blocks(model, first_input, blocks, prefix=steps[grouped[0]][0] if grouped else 0)


def skip_blocks(model, prompt_tokens: int, example_ids: torch.Tensor) -> Blocks:
    """The kept layers after each skipped run of a Unified Layer Skipping CqilForCausalLM as
    blocks. Student: the skipping model on a window as prompt (its first prompt_tokens tokens,
    every layer) and continuation (kept layers only); original: every token through every
    layer. The loss covers every position (the prompt's, unchanged at first, feed the later
    layers' keys and values)."""
    inner = model.model
    config = model.config
    if any(len(group) != 1 for group in config.groups):
        raise CqilError("a skipping model has single layers only")
    n = config.num_hidden_layers
    kept = [i for i in range(n) if i not in set(config.skip_layers)]
    units = repair_units(n, kept)
    one = _on_model(model, example_ids[:1])
    _, student_context = inner.prepare_steps(one, prompt_length=max(prompt_tokens, 1))
    _, full_context = inner.prepare_steps(one)

    def run(first: int, stop: int, context):
        return lambda x: inner.run_steps(x, context, steps=range(first, stop))

    def first_input(ids):
        x, _ = inner.prepare_steps(ids)
        return inner.run_steps(x, student_context, steps=range(units[0][0] if units else 0))

    blocks = []
    for k, (start, stop, layer) in enumerate(units):
        following = units[k + 1][0] if k + 1 < len(units) else n
        blocks.append(Block(f"layers {start}-{stop - 1} -> {layer}", [inner.layers[layer]],
                            student=run(start, stop, student_context),
                            original=run(start, stop, full_context),
                            after=run(stop, following, student_context),
                            passes=2 * (stop - start) + following - stop))
    return Blocks(model, first_input, blocks, prefix=units[0][0] if units else 0)


class _Captured(Exception):
    """Raised by a forward pre-hook to stop a forward once a layer's input is captured."""


def _layer_output(output):
    return output[0] if isinstance(output, tuple) else output  # transformers < 5: a tuple


def layer_arguments(model, example_ids: torch.Tensor) -> list[dict]:
    """The keyword arguments a transformers decoder calls each of its layers with (attention
    mask, rotary embeddings, positions …) on windows shaped like example_ids[:1]; with no padding
    they depend on the window length only and broadcast over any batch."""
    captured: list[dict] = [{} for _ in model.model.layers]

    def hook(index):
        def record(_module, _args, kwargs):
            captured[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return record

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(input_ids=_on_model(model, example_ids[:1]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _layer_input(model, index: int, ids: torch.Tensor) -> torch.Tensor:
    """The hidden state that layer `index` of a transformers decoder receives for ids."""
    seen = {}

    def stop(_module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        raise _Captured

    handle = model.model.layers[index].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen["x"]


def prune_blocks(teacher, student, kept: list[int], example_ids: torch.Tensor) -> Blocks:
    """The kept layers next to each removed run of a pruned transformers model as blocks.

    teacher: the original model (all layers); student: the same with only layers `kept` (new
    index i is original layer kept[i]). Original: the teacher's layers of the unit's span in
    sequence; student: the kept layer alone. Layers run as their decoder runs them, with the
    arguments layer_arguments captured."""
    n = len(teacher.model.layers)
    student_args = layer_arguments(student, example_ids)
    teacher_args = layer_arguments(teacher, example_ids)
    position = {layer: i for i, layer in enumerate(kept)}
    units = repair_units(n, kept)

    def replay(model, arguments, indices):
        def run(x):
            for i in indices:
                x = _layer_output(model.model.layers[i](x, **arguments[i]))
            return x
        return run

    def first_input(ids):
        return _layer_input(student, position[units[0][2]], ids)

    blocks = []
    for k, (start, stop, layer) in enumerate(units):
        here = position[layer]
        following = position[units[k + 1][2]] if k + 1 < len(units) else len(kept)
        blocks.append(Block(f"layers {start}-{stop - 1} -> {layer}", [student.model.layers[here]],
                            student=replay(student, student_args, [here]),
                            original=replay(teacher, teacher_args, range(start, stop)),
                            after=replay(student, student_args, range(here + 1, following)),
                            passes=stop - start + following - here))
    return Blocks(student, first_input, blocks,
                  prefix=position[units[0][2]] if units else 0)


__all__ = ["Block", "Blocks", "LocalOptions", "LocalResult", "block_loss", "cqil_blocks",
           "prune_blocks", "reconstruct", "repair_units", "restore", "skip_blocks"]
