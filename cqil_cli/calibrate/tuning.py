"""Tuning: a brief distillation of a converted model from the original (docs/method.md).

tune_groups (cqil), on the runtime's own steps (CqilModel.prepare_steps / run_steps):
  teacher  the same weights run sequentially, every layer on its own input, LoRA off: the
           original model, with no second copy in memory;
  student  the grouped model (reference engine, differentiable), LoRA on;
  loss     KL(teacher ‖ student) of the next-token distributions, mean per token, from the
           two models' final hidden states through the (frozen) head a chunk of positions at a
           time (core.metrics.mean_kl_of_hidden): the [B, T, V] logits never exist whole.
  Trainable: the bypass weights (γ of every grouped layer, β of the bypass) and, with
  lora_rank > 0, LoRA adapters on the linear layers of the grouped layers.
  The steps before the first group are identical for teacher and student: they run once per
  batch, without gradients. After a local stage (calibrate/reconstruct.py) changed the
  layers' own weights, `originals` [(parameter, its value before)] puts the original values
  back for the teacher's pass only (weights_swapped: no copy), so the teacher stays the
  original model.
tune_from_teacher (prune) and tune_skip (Unified Layer Skipping): LoRA only, same loss.

LoRA adapters stay attached when these return; the caller evaluates, then merges them into the
weights or drops them (detach_lora). On a CPU with bf16 support, forward and backward run under
bf16 autocast (about 2.7× faster than fp32 at nearly the same KL); the trainable weights stay
fp32. Elsewhere a bf16 or fp16 model's linear layers compute in fp32 (calibrate/precision.py).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.errors import CqilError
from ..core.metrics import mean_kl_of_hidden
from .evaluate import head_of, prompt_kwargs
from .options import TuneOptions
from .precision import fp32_linears, resolve_precision, same_linears

# The linear modules of a decoder layer that LoRA may wrap, by their names in the base
# checkpoint: Llama, Mistral, Qwen, Gemma 2/3 have q/k/v_proj and gate/up_proj; Phi-3 the fused
# self_attn.qkv_proj [(H + 2G)·hd, d] and mlp.gate_up_proj [2I, d] instead (one adapter on each
# fused matrix). attach_lora_to wraps those a layer has (lora_targets).
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj",
                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj",
                "mlp.down_proj")


@dataclass
class TuneResult:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    precision: str = "fp32"


class LoRALinear(nn.Module):
    """y = W x + b + (α/r) · B A x, with A [r, in], B [out, r]; B starts at 0 (y unchanged)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + (x @ self.lora_a.t().to(x.dtype)) @ (self.lora_b.t() * self.scale).to(x.dtype)
        return y

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale  # [out, in] fp32
        weight = self.base.weight
        weight.copy_((weight.float() + delta).to(weight.dtype))  # one rounding, in place
        return self.base


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def attach_lora(model, layer_indices: list[int], rank: int) -> list[LoRALinear]:
    return attach_lora_to([model.model.layers[idx] for idx in layer_indices], rank)


def lora_targets(layer: nn.Module) -> list[str]:
    """The names in LORA_TARGETS that are nn.Linear modules of `layer` (Phi-3: its fused
    qkv_proj and gate_up_proj in place of q/k/v and gate/up), in LORA_TARGETS order."""
    found = []
    for target in LORA_TARGETS:
        try:
            module = layer.get_submodule(target)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            found.append(target)
    return found


def attach_lora_to(layers: list[nn.Module], rank: int) -> list[LoRALinear]:
    """LoRA adapters (α = 2 × rank) on the linear modules of each of `layers` that
    lora_targets finds; a CqilError for a layer with none of them.

    detach_lora(merge=True) adds each adapter into its base weight in place, so the fused
    engine, whose step buffers the weights are views of, sees the merged values (the in-place
    update bumps the version it checks, and it rebuilds its steps)."""
    adapters = []
    for position, layer in enumerate(layers):
        targets = lora_targets(layer)
        if not targets:
            index = getattr(layer, "layer_idx", position)
            raise CqilError(f"LoRA: layer {index} ({type(layer).__name__}) has none of the "
                            f"linear modules it targets ({', '.join(LORA_TARGETS)})")
        for target in targets:
            base = layer.get_submodule(target)
            adapter = LoRALinear(base, rank, alpha=2.0 * rank).to(base.weight.device)
            _set_module(layer, target, adapter)
            adapters.append(adapter)
    return adapters


def detach_lora(model, merge: bool) -> None:
    """Replace every LoRALinear by its base Linear, merging the adapter first if asked."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_module(model, name, module.merged() if merge else module.base)


def set_lora_enabled(model, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.enabled = enabled


def bypass_parameters(model) -> list[nn.Parameter]:
    params = []
    for layer in model.model.layers:
        for p in (getattr(layer, "cqil_gamma", None), getattr(layer, "cqil_beta", None)):
            if p is not None:
                params.append(p)
    return params


Pairs = Sequence[tuple[nn.Parameter, torch.Tensor]]  # (parameter, a value of it)
# `originals` below: the original values of the parameters a local stage changed, as Pairs or
# as a ParameterBackup that holds them on disk (convert's: no copy stays in memory).


def original_pairs(originals: Pairs | ParameterBackup, params=None) -> Pairs:
    """[(parameter, original value)] of `originals` for the parameters in `params` (None: all),
    the values on their parameters' devices; read from disk for a ParameterBackup."""
    wanted = None if params is None else {id(p) for p in params}
    if isinstance(originals, ParameterBackup):
        return originals.pairs(params)
    return [(p, value.to(p.device)) for p, value in originals
            if wanted is None or id(p) in wanted]


@contextmanager
def weights_swapped(originals: Pairs):
    """Within the block, each parameter holds its original value: `.data` is pointed at it
    (same device and dtype, no copy) and pointed back after, so that the optimizer, LoRA
    wrappers and the fused engine's views keep the very tensors they had."""
    held = [(p, p.data) for p, _ in originals]
    try:
        for p, value in originals:
            p.data = value
        yield
    finally:
        for p, data in held:
            p.data = data


def teacher_and_student_hidden(model, ids: torch.Tensor, originals: Pairs | ParameterBackup = (),
                               checkpointed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-normed hidden states [B, T, d] of the teacher (no gradient) and of the student of
    a grouped model on ids [B, T] (see the module docstring), sharing the steps before the
    first group (which a local stage does not change: its blocks start at the first group).
    model.compute_logits turns them into logits."""
    inner = model.model
    groups = model.config.groups
    first = next((s for s, g in enumerate(groups) if len(g) > 1), len(groups))
    tuned = range(first, len(groups))
    with torch.no_grad():
        x, context = inner.prepare_steps(ids)
        x = inner.run_steps(x, context, steps=range(first))  # shared, computed once
        set_lora_enabled(model, False)  # the teacher never sees LoRA
        try:
            teacher = x
            for step in tuned:  # one step's original weights at a time, read when needed
                layers = inner.step_layers(step)
                with weights_swapped(original_pairs(originals, [p for layer in layers
                                                                for p in layer.parameters()])):
                    teacher = inner.run_steps(teacher, context, steps=range(step, step + 1),
                                              sequential=True)
            teacher = inner.norm(teacher)
        finally:
            set_lora_enabled(model, True)
    if not checkpointed:
        return teacher, inner.norm(inner.run_steps(x, context, steps=tuned))
    for step in tuned:  # each step's activations recomputed in the backward, not kept
        x = checkpoint(inner.run_steps, x, context, steps=range(step, step + 1),
                       use_reentrant=False, context_fn=same_linears)
    return teacher, inner.norm(x)


def teacher_and_student(model, ids: torch.Tensor,
                        originals: Pairs | ParameterBackup = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits [B, T, V] of teacher_and_student_hidden's two hidden states (with Gemma 2's
    final soft-cap, as in forward())."""
    teacher, student = teacher_and_student_hidden(model, ids, originals)
    return model.compute_logits(teacher), model.compute_logits(student)


def random_batches(calib_ids: torch.Tensor, batch_size: int, seed: int):
    """Endless random batches of calib_ids [n, L], reshuffled each epoch, seeded."""
    generator = torch.Generator().manual_seed(seed)
    n = calib_ids.shape[0]
    while True:
        order = torch.randperm(n, generator=generator)
        for cursor in range(0, n - batch_size + 1, batch_size):
            yield calib_ids[order[cursor:cursor + batch_size]]


def _optimise(kl_of_batch: Callable[[torch.Tensor], torch.Tensor], optimizer, calib_ids,
              options: TuneOptions, device, result: TuneResult,
              on_step: Callable[[int, float, float], None] | None) -> TuneResult:
    """Batches until the step or time bound, one optimizer step per batch on the KL that
    kl_of_batch(ids) returns."""
    start = time.perf_counter()
    deadline = start + options.minutes * 60 if options.minutes is not None else math.inf
    batches = random_batches(calib_ids, options.batch_size, options.seed)
    while (options.steps is None or result.steps < options.steps) and \
            time.perf_counter() < deadline:
        loss = kl_of_batch(next(batches).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.steps += 1
        result.losses.append(loss.item())
        if on_step:
            on_step(result.steps, result.losses[-1], time.perf_counter() - start)
    result.seconds = time.perf_counter() - start
    return result


def _tune(model, bypass: list[nn.Parameter], lora_layers: list[int], calib_ids: torch.Tensor,
          options: TuneOptions, on_step, kl_of_batch) -> TuneResult:
    """The training all three tunings share: everything of `model` frozen but `bypass` and
    LoRA adapters on `lora_layers` (with lora_rank > 0); AdamW; batches of calib_ids [n, L]
    until the bound, one step on kl_of_batch(ids) each, under autocast. Afterwards model is in
    eval mode with LoRA on and every weight frozen."""
    if options.steps is None and options.minutes is None:
        raise CqilError("tuning needs a bound: a number of steps or of minutes")
    device = next(model.parameters()).device
    precision = resolve_precision(options.precision, device)
    torch.manual_seed(options.seed)  # the LoRA initialisation
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = attach_lora(model, lora_layers, options.lora_rank) if options.lora_rank > 0 else []
    for p in bypass:
        p.requires_grad_(True)
    param_groups = []
    if bypass:
        param_groups.append({"params": bypass, "lr": options.lr_bypass})
    if adapters:
        param_groups.append({"params": [p for a in adapters for p in (a.lora_a, a.lora_b)],
                             "lr": options.lr_lora})
    if not param_groups:
        return TuneResult(precision=precision)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def autocast_kl(ids):
        with autocast:
            return kl_of_batch(ids)

    model.train()
    try:
        with fp32_linears(precision, model):
            return _optimise(autocast_kl, optimizer, calib_ids, options, device,
                             TuneResult(precision=precision), on_step)
    finally:
        set_lora_enabled(model, True)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None  # the last step's gradients, which nothing reads


def tune_groups(model, calib_ids: torch.Tensor, options: TuneOptions,
                on_step: Callable[[int, float, float], None] | None = None,
                originals: Pairs | ParameterBackup = ()) -> TuneResult:
    """Train the bypass weights (and LoRA) of the grouped CqilForCausalLM `model` in place on
    calib_ids [n, L]: KL(teacher ‖ student) of teacher_and_student. A model without groups
    has nothing to train and is left unchanged.

    LoRA adapters stay attached (unmerged) when this returns: the caller evaluates, then calls
    detach_lora(model, merge=True) to keep them or merge=False to drop them.
    on_step(step, loss, elapsed seconds) is called after every optimizer step. originals:
    the weights the teacher runs with where a local stage changed them (module docstring).
    """
    grouped = [i for g in model.config.groups if len(g) > 1 for i in g]
    return _tune(model, bypass_parameters(model), grouped, calib_ids, options, on_step,
                 lambda ids: mean_kl_of_hidden(*teacher_and_student_hidden(
                     model, ids, originals, checkpointed=True), model.compute_logits))


def tune_from_teacher(teacher, student, lora_layers: list[int], calib_ids: torch.Tensor,
                      options: TuneOptions,
                      on_step: Callable[[int, float, float], None] | None = None) -> TuneResult:
    """Distil a separate teacher into a plain student (comparison strategies, e.g. prune).

    Unlike tune_groups, the teacher is another model (the original, kept in memory): a pruned
    student no longer holds the removed layers. Trainable: LoRA on student layers
    `lora_layers` only (plain models have no bypass weights). Adapters stay attached.
    """
    for p in teacher.parameters():
        p.requires_grad_(False)

    def kl_of_batch(ids):  # model.model: the base model's final-normed hidden states
        with torch.no_grad():
            reference = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
        hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
        return mean_kl_of_hidden(reference, hidden, head_of(student))

    return _tune(student, [], lora_layers, calib_ids, options, on_step, kl_of_batch)


def tune_skip(model, lora_layers: list[int], calib_ids: torch.Tensor, options: TuneOptions,
              prompt_tokens: int,
              on_step: Callable[[int, float, float], None] | None = None,
              originals: Pairs | ParameterBackup = ()) -> TuneResult:
    """Tune a Unified Layer Skipping model (a CqilForCausalLM with skip_layers) in place.

    Each calibration window [L] is a prompt (the first prompt_tokens tokens, every layer)
    and a continuation (the kept layers only), in one forward (prompt_length). Teacher = the
    same weights with every layer for every token and LoRA off (no second copy in memory);
    the loss is KL(teacher ‖ student) on the continuation's predictions. Trainable: LoRA on
    `lora_layers`. Adapters stay attached, as in tune_groups; originals as there.
    """
    start = max(prompt_tokens - 1, 0)  # the first prediction of the continuation
    extra = prompt_kwargs(model, prompt_tokens)

    def kl_of_batch(ids):
        with torch.no_grad():
            set_lora_enabled(model, False)  # the teacher: the original model
            try:
                with weights_swapped(original_pairs(originals)):
                    teacher = model.model(input_ids=ids, use_cache=False).last_hidden_state
            finally:
                set_lora_enabled(model, True)
        student = model.model(input_ids=ids, use_cache=False, **extra).last_hidden_state
        return mean_kl_of_hidden(teacher[:, start:], student[:, start:], model.compute_logits)

    return _tune(model, [], lora_layers, calib_ids, options, on_step, kl_of_batch)


def lora_base_weights(model) -> list[nn.Parameter]:
    """The weights that detach_lora(merge=True) would change: each adapter's base weight."""
    return [m.base.weight for m in model.modules() if isinstance(m, LoRALinear)]


class ParameterBackup:
    """Bit-exact copies of parameters in a temporary file, without a second copy of them in
    memory: the undo of a LoRA merge (which rounds, in bf16 enough to lose a small gain, and
    cannot be subtracted back exactly), and the local stage's record of the weights it changed
    (restore() undoes the stage; pairs() gives the end-to-end teacher its original weights, a
    step's at a time). add() appends parameters, each written once with its value at that
    moment (a parameter already saved keeps its first value); close() deletes the file."""

    def __init__(self, params: Sequence[nn.Parameter] = ()):
        import tempfile

        self.file = tempfile.TemporaryFile(prefix="cqil-saved-")
        self.saved: dict[int, tuple[nn.Parameter, int]] = {}  # id -> (parameter, file offset)
        self.add(params)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p, _ in self.saved.values()]

    def __len__(self) -> int:
        return len(self.saved)

    @torch.no_grad()
    def add(self, params: Sequence[nn.Parameter]) -> None:
        self.file.seek(0, 2)  # the end
        for p in params:
            if id(p) in self.saved:
                continue
            self.saved[id(p)] = (p, self.file.tell())
            raw = p.detach().to("cpu", copy=False).contiguous().view(-1).view(torch.uint8)
            self.file.write(raw.numpy().tobytes())

    def value(self, p: nn.Parameter) -> torch.Tensor:
        """p's saved value: a new CPU tensor of p's dtype and shape."""
        self.file.seek(self.saved[id(p)][1])
        data = bytearray(self.file.read(p.numel() * p.element_size()))
        return torch.frombuffer(data, dtype=torch.uint8).view(p.dtype).view(p.shape)

    def pairs(self, params: Sequence[nn.Parameter] | None = None
              ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """[(parameter, saved value on its device)] of the saved ones among params (None: all)."""
        chosen = self.params if params is None else [p for p in params if id(p) in self.saved]
        return [(p, self.value(p).to(p.device)) for p in chosen]

    @torch.no_grad()
    def restore(self) -> None:
        for p in self.params:
            p.copy_(self.value(p))  # into the parameter's own (possibly re-laid-out) storage

    def close(self) -> None:
        self.file.close()
        self.saved.clear()


def snapshot_bypass(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in bypass_parameters(model)]


@torch.no_grad()
def restore_bypass(model, saved: list[torch.Tensor]) -> None:
    for p, value in zip(bypass_parameters(model), saved, strict=True):
        p.copy_(value)


__all__ = ["ParameterBackup", "TuneOptions", "TuneResult", "detach_lora", "lora_base_weights",
           "original_pairs", "restore_bypass", "snapshot_bypass", "teacher_and_student",
           "teacher_and_student_hidden", "tune_from_teacher", "tune_groups", "tune_skip",
           "weights_swapped"]
