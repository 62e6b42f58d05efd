"""The blocks each strategy changes, for the local tuning stage (calibrate/reconstruct.py): a
cqil group against its layers in sequence; the kept layer after a skipped or removed run against
that run and the layer."""

from __future__ import annotations

import torch

from ..calibrate.blocks import Block, Blocks
from ..core.errors import CqilError


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
