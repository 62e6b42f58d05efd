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
from .blocks import Block, Blocks, cache_energy
from .closed_form import closed_form_start
from .options import LOCAL_LOSSES, LOCAL_PARAMS, LocalOptions
from .precision import fp32_linears, resolve_precision
from .tuning import ParameterBackup, attach_lora_to, detach_lora, random_batches


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
            closed_form_start(block, x, y, options)
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
    return outputs, error / cache_energy(x, y)


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


__all__ = ["Block", "Blocks", "LocalOptions", "LocalResult", "block_loss", "reconstruct", "restore"]
