"""Brief distillation of a converted model (docs/method.md).

teacher  the same weights run sequentially, every layer on its own input, LoRA off: no second
         copy of the model in memory;
student  the grouped model (reference engine, differentiable), LoRA on;
loss     KL(teacher ‖ student) of the next-token distributions, mean per token.
Trainable: the bypass weights (γ of every grouped layer, β of the bypass) and, with
lora_rank > 0, LoRA adapters on the linear layers of the grouped layers, merged into the
weights at the end so the output holds no adapter.

The layers before the first group are identical for teacher and student: they run once per
batch, without gradients. On a CPU with bf16 support, forward and backward run under bf16
autocast (about 2.7× faster than fp32 at nearly the same KL); the trainable weights stay fp32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CqilError

LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class TuneOptions:
    steps: int | None = None  # stop after this many optimizer steps …
    minutes: float | None = 3.0  # … or after this much wall time, whichever comes first
    lora_rank: int = 16
    lr_bypass: float = 2e-3
    lr_lora: float = 1e-3
    batch_size: int = 4
    precision: str = "auto"  # auto | bf16 | fp32 (autocast dtype of forward/backward)
    seed: int = 0


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
        delta = (self.lora_b @ self.lora_a) * self.scale  # [out, in]
        self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def attach_lora(model, layer_indices: list[int], rank: int) -> list[LoRALinear]:
    adapters = []
    for idx in layer_indices:
        layer = model.model.layers[idx]
        for target in LORA_TARGETS:
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
        for p in (layer.cqil_gamma, layer.cqil_beta):
            if p is not None:
                params.append(p)
    return params


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise CqilError(f"unknown tuning precision '{precision}' (auto, bf16 or fp32)")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


class _Runner:
    """Forward passes of the teacher and the student from shared prefix activations."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        groups = self.config.groups
        self.first_step = next((s for s, g in enumerate(groups) if len(g) > 1), len(groups))

    def masks(self, x):
        from ..runtime.modeling_cqil import build_attention_mask

        B, T, _ = x.shape
        out = {}
        for kind in set(self.config.layer_types):
            window = self.config.sliding_window if kind == "sliding_attention" else None
            out[kind] = build_attention_mask(None, B, T, 0, window, x.device)
        return out

    def prefix(self, ids):
        """Embedding and the single layers before the first group: [B, T, d], rope, masks."""
        from ..runtime.modeling_cqil import reference_step

        inner = self.model.model
        x = inner.embed_tokens(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        cos, sin = inner.rotary_emb(x, pos)
        masks = self.masks(x)
        for s in range(self.first_step):
            layers = inner.step_layers(s)
            mask, causal = masks[self.config.layer_types[layers[0].layer_idx]]
            x = reference_step(layers, x, cos, sin, mask, causal, None, s)
        return x, cos, sin, masks

    def logits(self, x):
        return self.model.lm_head(self.model.model.norm(x))

    def teacher(self, x, cos, sin, masks):
        """Every remaining layer on its own, in sequence (the original model)."""
        from ..runtime.modeling_cqil import reference_step

        inner = self.model.model
        for s in range(self.first_step, len(self.config.groups)):
            for layer in inner.step_layers(s):
                mask, causal = masks[self.config.layer_types[layer.layer_idx]]
                x = reference_step([layer], x, cos, sin, mask, causal, None, 0)
        return self.logits(x)

    def student(self, x, cos, sin, masks):
        from ..runtime.modeling_cqil import reference_step

        inner = self.model.model
        for s in range(self.first_step, len(self.config.groups)):
            layers = inner.step_layers(s)
            mask, causal = masks[self.config.layer_types[layers[0].layer_idx]]
            x = reference_step(layers, x, cos, sin, mask, causal, None, s)
        return self.logits(x)


def _batches(calib_ids: torch.Tensor, batch_size: int, seed: int):
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
    """The loop both distillations share: batches until the step or time bound, one
    optimizer step per batch on the KL that kl_of_batch(ids) returns."""
    start = time.perf_counter()
    deadline = start + options.minutes * 60 if options.minutes is not None else math.inf
    batches = _batches(calib_ids, options.batch_size, options.seed)
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


def _train(model, kl_of_batch, optimizer, calib_ids, options: TuneOptions, device, precision: str,
           on_step) -> TuneResult:
    """Run _optimise with model in train mode; afterwards eval mode, LoRA on, weights frozen."""
    model.train()
    try:
        return _optimise(kl_of_batch, optimizer, calib_ids, options, device,
                         TuneResult(precision=precision), on_step)
    finally:
        set_lora_enabled(model, True)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) from logits [B, T, V]."""
    teacher = torch.log_softmax(teacher_logits.float(), -1).flatten(0, 1)
    student = torch.log_softmax(student_logits.float(), -1).flatten(0, 1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def distill(model, calib_ids: torch.Tensor, options: TuneOptions,
            on_step: Callable[[int, float, float], None] | None = None) -> TuneResult:
    """Train the bypass weights (and LoRA) of `model` in place on calib_ids [n, L].

    LoRA adapters stay attached (unmerged) when this returns: the caller evaluates, then calls
    detach_lora(model, merge=True) to keep them or merge=False to drop them.
    on_step(step, loss, elapsed seconds) is called after every optimizer step.
    """
    if options.steps is None and options.minutes is None:
        raise CqilError("tuning needs a bound: a number of steps or of minutes")
    device = next(model.parameters()).device
    precision = resolve_precision(options.precision, device)
    torch.manual_seed(options.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    grouped = [i for g in model.config.groups if len(g) > 1 for i in g]
    bypass = bypass_parameters(model)
    adapters = attach_lora(model, grouped, options.lora_rank) if options.lora_rank > 0 else []
    for p in bypass:
        p.requires_grad_(True)
    param_groups = [{"params": bypass, "lr": options.lr_bypass}]
    if adapters:
        param_groups.append({"params": [p for a in adapters for p in (a.lora_a, a.lora_b)],
                             "lr": options.lr_lora})
    if not bypass and not adapters:
        return TuneResult(precision=precision)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    runner = _Runner(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def kl_of_batch(ids):
        with autocast:
            with torch.no_grad():
                x, cos, sin, masks = runner.prefix(ids)  # shared, computed once
                set_lora_enabled(model, False)  # the teacher never sees LoRA
                teacher = runner.teacher(x, cos, sin, masks)
                set_lora_enabled(model, True)
            return _kl(runner.student(x, cos, sin, masks), teacher)

    return _train(model, kl_of_batch, optimizer, calib_ids, options, device, precision, on_step)


def snapshot_bypass(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in bypass_parameters(model)]


@torch.no_grad()
def restore_bypass(model, saved: list[torch.Tensor]) -> None:
    for p, value in zip(bypass_parameters(model), saved, strict=True):
        p.copy_(value)


def prompt_kwargs(model, prompt_tokens: int) -> dict:
    """forward() arguments that make a skip model treat the first prompt_tokens as its prompt."""
    if not getattr(model.config, "skip_layers", None):
        return {}
    return {"prompt_length": max(prompt_tokens, 1)}  # a generation needs at least one prompt token


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch_size: int = 4, prompt_tokens: int = 0) -> float:
    """exp(mean next-token NLL) of model on ids [n, L], batch by batch.

    The first prompt_tokens tokens of each window are the prompt: context, not scored (a model
    with skip_layers runs them through every layer, as its prompt). Scored are tokens
    prompt_tokens..L-1, predicted from positions prompt_tokens-1..L-2, i.e. exactly the tokens
    a generation after that prompt would produce (teacher-forced).
    """
    device = next(model.parameters()).device
    start = max(prompt_tokens - 1, 0)
    extra = prompt_kwargs(model, prompt_tokens)
    total, count = 0.0, 0
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False, **extra).logits[:, start:-1].float()
        targets = batch[:, start + 1:]
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        total += nll.item()
        count += targets.numel()
    return math.exp(total / count)


__all__ = ["TuneOptions", "TuneResult", "distill", "distill_from_teacher", "distill_skip", "detach_lora",
           "perplexity", "prompt_kwargs", "snapshot_bypass", "restore_bypass"]


def _lora_distillation(student, lora_layers: list[int], calib_ids: torch.Tensor,
                       options: TuneOptions, on_step, make_kl) -> TuneResult:
    """LoRA-only distillation of the comparison strategies: LoRA on `lora_layers` of student,
    every other weight frozen; make_kl(autocast) returns the batch -> KL function."""
    if options.steps is None and options.minutes is None:
        raise CqilError("tuning needs a bound: a number of steps or of minutes")
    if options.lora_rank <= 0 or not lora_layers:
        return TuneResult()
    device = next(student.parameters()).device
    precision = resolve_precision(options.precision, device)
    torch.manual_seed(options.seed)
    for p in student.parameters():
        p.requires_grad_(False)
    adapters = attach_lora(student, lora_layers, options.lora_rank)
    params = [p for a in adapters for p in (a.lora_a, a.lora_b)]
    optimizer = torch.optim.AdamW(params, lr=options.lr_lora, weight_decay=0.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    return _train(student, make_kl(autocast), optimizer, calib_ids, options, device, precision,
                  on_step)


def distill_from_teacher(teacher, student, lora_layers: list[int], calib_ids: torch.Tensor,
                         options: TuneOptions,
                         on_step: Callable[[int, float, float], None] | None = None
                         ) -> TuneResult:
    """Distil a separate teacher into a plain student (comparison strategies, e.g. prune).

    Unlike `distill`, the teacher is another model (the original, kept in memory): a pruned
    student no longer holds the removed layers. Trainable: LoRA on student layers
    `lora_layers` only (plain models have no bypass weights). Adapters stay attached.
    """
    for p in teacher.parameters():
        p.requires_grad_(False)

    def make_kl(autocast):
        def kl_of_batch(ids):
            with autocast:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids, use_cache=False).logits
                return _kl(student(input_ids=ids, use_cache=False).logits, teacher_logits)
        return kl_of_batch

    return _lora_distillation(student, lora_layers, calib_ids, options, on_step, make_kl)


def distill_skip(model, lora_layers: list[int], calib_ids: torch.Tensor, options: TuneOptions,
                 prompt_tokens: int,
                 on_step: Callable[[int, float, float], None] | None = None) -> TuneResult:
    """Distil a Unified Layer Skipping model (a CqilForCausalLM with skip_layers) in place.

    Each calibration window [L] is a prompt (the first prompt_tokens tokens, every layer)
    and a continuation (the kept layers only), in one forward (prompt_length). Teacher = the
    same weights with every layer for every token and LoRA off (no second copy in memory);
    the loss is KL(teacher ‖ student) on the continuation's predictions. Trainable: LoRA on
    `lora_layers`. Adapters stay attached, as in `distill`.
    """
    start = max(prompt_tokens - 1, 0)  # the first prediction of the continuation

    def make_kl(autocast):
        def kl_of_batch(ids):
            with autocast:
                with torch.no_grad():
                    set_lora_enabled(model, False)  # the teacher: the original model
                    teacher = model(input_ids=ids, use_cache=False).logits[:, start:]
                    set_lora_enabled(model, True)
                student = model(input_ids=ids, use_cache=False, **prompt_kwargs(model, prompt_tokens)).logits
                return _kl(student[:, start:], teacher)
        return kl_of_batch

    return _lora_distillation(model, lora_layers, calib_ids, options, on_step, make_kl)
