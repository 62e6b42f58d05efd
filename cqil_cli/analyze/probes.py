"""Finding the decoder layers of any transformers causal LM, and steering them one by one.

`analyze` must work on decoder-only models beyond the families cqil converts, so it does not
build layer inputs itself: it wraps each layer in a `LayerProxy` and runs the model's own
forward. A proxy can time its layer, record its input and the exact arguments the model called
it with (to call it again later on another hidden state: `call_on`), or skip it (replaying a
given output), which is all analyze needs.
"""

from __future__ import annotations

import contextlib
import inspect
import time

import torch
from torch import nn

from ..core.devices import synchronize
from ..core.errors import CqilError

# Where decoder stacks live in the transformers model zoo, most common first.
LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
               "transformer.blocks", "transformer.layers", "model.language_model.layers")


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, str, str]:
    """(parent module, attribute name, dotted path) of the model's decoder ModuleList."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise CqilError(f"'{model.config.model_type}' is an encoder-decoder model; cqil works "
                        "on decoder-only causal LMs")
    for path in LAYER_PATHS:
        parent, obj = None, model
        for part in path.split("."):
            parent, obj = obj, getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return parent, path.rsplit(".", 1)[-1], path
    raise CqilError(f"cannot find the decoder layers of '{model.config.model_type}' "
                    f"(looked for {', '.join(LAYER_PATHS)}); supported without question: "
                    "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3")


def _hidden_of(args, kwargs) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise CqilError("cannot find the hidden states among a decoder layer's inputs")


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def cache_kwargs(model: nn.Module, output) -> dict:
    """forward() keyword arguments that continue from the KV cache a model output carries.

    transformers 5.24 renamed past_key_values to cache (in outputs and in forward's
    parameters; the old name still works, with a deprecation warning); older releases and
    cqil's own model use past_key_values."""
    fields = getattr(output, "__dataclass_fields__", {})
    cache = getattr(output, "cache" if "cache" in fields else "past_key_values")
    takes_cache = "cache" in inspect.signature(model.forward).parameters
    return {"cache": cache} if takes_cache else {"past_key_values": cache}


def _replace_hidden_out(output, hidden):
    if isinstance(output, (tuple, list)):
        return (hidden, *output[1:])
    return hidden


class LayerProxy(nn.Module):
    """Wraps one decoder layer; the analyzer sets its mode between forward passes.

    Modes: "run" (call the layer; optionally time it, and record its input, its arguments and
    its output), "replay" (return `replay_output` without computing: the layer lies before the
    part of the model under study).
    """

    def __init__(self, inner: nn.Module, index: int):
        super().__init__()
        self.inner = inner
        self.index = index
        self.mode = "run"
        self.record_input = False
        self.recorded_input: torch.Tensor | None = None
        self.recorded_output = None  # output structure of the last "run" (for replay)
        self.recorded_call: tuple[tuple, dict] | None = None  # (args, kwargs) of that run
        self.timer: list[float] | None = None  # seconds appended per call when set
        self.replay_output = None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Some model forwards read attributes of their layers (e.g. attention_type).
            return getattr(super().__getattr__("inner"), name)

    def forward(self, *args, **kwargs):
        if self.mode == "replay":
            return self.replay_output
        if self.record_input:
            self.recorded_input = _hidden_of(args, kwargs)
            self.recorded_call = (args, kwargs)
        if self.timer is None:
            out = self.inner(*args, **kwargs)
        else:
            hidden = _hidden_of(args, kwargs)
            synchronize(hidden.device)
            start = time.perf_counter()
            out = self.inner(*args, **kwargs)
            synchronize(hidden.device)
            self.timer.append(time.perf_counter() - start)
        if self.record_input:
            self.recorded_output = out
        return out


    def call_on(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output hidden state [B, T, H] for another input `hidden` [B, T, H],
        called with the arguments of the recorded run (mask, positions, …) otherwise."""
        args, kwargs = _with_hidden(*self.recorded_call, hidden)
        return hidden_out(self.inner(*args, **kwargs))

    def replay_with(self, hidden: torch.Tensor) -> None:
        """Replay mode, returning the recorded output's structure with `hidden` in it."""
        self.mode, self.replay_output = "replay", _replace_hidden_out(self.recorded_output, hidden)

    def reset(self) -> None:
        """Back to a plain "run", dropping what was recorded."""
        self.mode, self.record_input, self.replay_output = "run", False, None
        self.recorded_input = self.recorded_output = self.recorded_call = None


@contextlib.contextmanager
def proxied_layers(model: nn.Module):
    """Wrap every decoder layer in a LayerProxy for the duration of the block."""
    parent, attr, _ = find_decoder_layers(model)
    original = getattr(parent, attr)
    proxies = nn.ModuleList([LayerProxy(layer, i) for i, layer in enumerate(original)])
    setattr(parent, attr, proxies)
    try:
        yield list(proxies)
    finally:
        setattr(parent, attr, original)
