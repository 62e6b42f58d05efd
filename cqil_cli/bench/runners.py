"""The two engines a bench entry runs on, each timed after every generated token.

  transformers  TransformersRunner: a plain checkpoint as its users run it, the transformers
                model and generate() (dynamic cache), greedy, exactly new_tokens tokens
  cqil          CqilRunner: cqil's fast path (runtime/fastgen.py: static KV cache, fused groups)
Both give a Timing per call (prefill, every decode step), greedy continuations and
teacher-forced logits. docs/bench.md says what each interval contains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..core.devices import synchronize
from ..core.errors import CqilError

ENGINES = ("transformers", "cqil")


@dataclass
class Timing:
    """One generate() call: prefill = start -> first new token, then each decode step."""

    prefill_s: float
    decode_s: list[float]  # new_tokens - 1 intervals between consecutive new tokens
    total_s: float
    tokens: torch.Tensor  # [B, new_tokens]


class TransformersRunner:
    """A plain checkpoint as users run it: the transformers model and generate()."""

    engine = "transformers"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device

    def _config(self, new_tokens: int):
        from transformers import GenerationConfig

        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        # Greedy, exactly new_tokens tokens (min = max suppresses an early end-of-sequence).
        return GenerationConfig(do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad,
                                use_cache=True)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Timing:
        """Greedy generation of new_tokens tokens after prompt [B, T], timed per token."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        device = self.device
        stamps: list[float] = []

        class _Clock(StoppingCriteria):  # called once after every new token
            def __call__(self, input_ids, scores, **kwargs):
                synchronize(device)
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        ids = prompt.to(device)
        mask = torch.ones_like(ids)
        config = self._config(new_tokens)
        synchronize(device)
        start = time.perf_counter()
        out = self.model.generate(ids, attention_mask=mask, generation_config=config,
                                  stopping_criteria=StoppingCriteriaList([_Clock()]))
        synchronize(device)
        end = time.perf_counter()
        tokens = out[:, ids.shape[1]:]
        if tokens.shape[1] != new_tokens or len(stamps) != new_tokens:
            raise CqilError(f"generate() made {tokens.shape[1]} tokens instead of {new_tokens}")
        decode = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        return Timing(stamps[0] - start, decode, end - start, tokens)

    def greedy(self, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """[N, new_tokens] greedy continuations of prompts [N, T]."""
        return self.generate(prompts, new_tokens).tokens

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, prompt_tokens: int = 0, keep: int = 0) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] of ids [B, T], or of its last `keep` positions only
        ([B, keep, V]: the head and the logits cost only what is scored); the first
        prompt_tokens of ids are the prompt (which matters only to a layer-skipping model: it
        runs its prompt through every layer)."""
        from ..calibrate.evaluate import last_logits, prompt_kwargs

        return last_logits(self.model, ids.to(self.device), keep,
                           **prompt_kwargs(self.model, prompt_tokens))


class CqilRunner(TransformersRunner):
    """cqil's fast path: fastgen's static-cache generation over the fused steps."""

    engine = "cqil"

    def __init__(self, model, tokenizer, compile: bool = False):
        from ..runtime.fastgen import FastGenerator

        self.generator = FastGenerator(model, compile=compile)  # converts a plain model
        super().__init__(self.generator.model, tokenizer)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Timing:
        ids = prompt.to(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        out = self.generator.generate(ids, torch.ones_like(ids), max_new_tokens=new_tokens)
        synchronize(self.device)
        end = time.perf_counter()
        if out.tokens.shape[1] != new_tokens:
            raise CqilError(f"cqil's engine made {out.tokens.shape[1]} tokens instead of "
                            f"{new_tokens}")
        # Time outside the generator's own clocks (input checks, cache set-up) joins the
        # prefill, as generate()'s set-up does on the transformers engine.
        prefill = (end - start) - sum(out.decode_s)
        return Timing(prefill, list(out.decode_s), end - start, out.tokens)


def is_converted(loaded) -> bool:
    """Whether a LoadedModel is a folder written by `cqil convert` (model_type cqil)."""
    return getattr(loaded, "model_type", None) == "cqil"


def engine_of(loaded) -> str:
    """The engine a model runs on by default: cqil's for a converted folder."""
    return "cqil" if is_converted(loaded) else "transformers"


def make_runner(loaded, engine: str, compile: bool = False) -> TransformersRunner:
    """The runner of a LoadedModel on an engine of ENGINES; a CqilError where it cannot run."""
    if engine == "transformers":
        return TransformersRunner(loaded.model, loaded.tokenizer)
    if engine == "cqil":
        from ..inputs.models import require_engine

        require_engine(loaded, "fastgen", f"'{loaded.spec}'")
        try:
            return CqilRunner(loaded.model, loaded.tokenizer, compile=compile)
        except ValueError as exc:
            raise CqilError(f"'{loaded.spec}' cannot run on cqil's engine: {exc}") from exc
    raise CqilError(f"unknown engine '{engine}' (choose {', '.join(ENGINES)})")
