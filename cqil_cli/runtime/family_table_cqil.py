"""The base model families cqil converts and runs: one row per transformers model_type, as data.

Every decision the code makes per family lives in its row (`Family`): which optional tensors
the layers have, Gemma's norms and scales, the soft-caps, Phi-3's fused projections, the kinds
of RoPE, which of cqil's engines run it, what a GGUF file of the family needs completed, and
tiny example configs for tests and device checks. The rest of cqil reads this table; no other
module of cqil_cli names a family.

  FAMILIES / MODEL_TYPES            the rows, by model_type / their model_types, in order
  family_of(model_type)             the row of a base model_type (UnsupportedFamily otherwise)
  require_engine(model, engine, what)  the one check "can this engine run this model": the row,
                                    or UnsupportedFamily with the one message format
  runs_on(model, engine)            the same check as a bool
  Family.config_fields(base_config) the CqilConfig fields the family decides (from_base_config)
  tiny_config(kind, **overrides)    a tiny example: (transformers config class name, settings)

Standard library only, on purpose: it is cheap to import (inputs/, bench/ and tests read it
without torch), and `cqil convert` copies it next to the converted weights with the other
runtime files, since configuration_cqil.py imports it. So it cannot raise cqil's own CqilError
(core/errors.py): it raises UnsupportedFamily, a ValueError; inputs/models.py's require_engine
turns it into a CqilError, the one-line error of the CLI.

Adding a family is adding a row (and, where the row needs a new kind of decision, a field the
runtime then implements: Granite's residual and logit multipliers would be FromConfig fields
beside embedding_scale; OLMo 2's post-only norms a `norms` value "post" and its q/k norms over
the whole projection a `qk_norm` value "projection"; Family.__post_init__ refuses values the
runtime does not implement yet).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# The engines a row may name (runtime/): the reference engine (modeling_cqil.reference_step:
# every family, the definition), the fused engine (fused_cqil.py), fast generation
# (fastgen.py) and the distributed engine (distributed_cqil.py, `--devices`).
ENGINES = ("reference", "fused", "fastgen", "distributed")
ENGINE_TITLES = {"reference": "cqil", "fused": "cqil's fused engine",
                 "fastgen": "cqil's fast path", "distributed": "cqil's distributed engine"}
SQRT_HIDDEN = "sqrt(hidden_size)"  # embedding_scale: x * sqrt(hidden), rounded to its dtype
# the norm layouts the runtime implements (families_cqil.py): "pre" N1, N2 (Llama); "sandwich"
# N1, Na, N2, Nf (Gemma); "post" Na, Nf only (OLMo 2)
NORMS = ("pre", "sandwich", "post")
# q/k RMSNorms: over each head ([head_dim]: Qwen3, Gemma 3) or the whole projection (OLMo 2)
QK_NORMS = (None, "per_head", "projection")
# What inputs/models.py completes in a GGUF file's config (its _GGUF_COMPLETIONS, same keys).
GGUF_COMPLETIONS = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                    "rope_parameters", "partial_rotary_factor", "sliding_window")
# Every tiny example: small sizes; the caller adds the vocabulary and the special token ids.
TINY_SIZES = MappingProxyType(dict(hidden_size=64, intermediate_size=96,
                                   max_position_embeddings=256, rms_norm_eps=1e-6,
                                   # larger than transformers' 0.02: layers differ visibly
                                   initializer_range=0.05))
_SLIDING, _FULL = "sliding_attention", "full_attention"


class UnsupportedFamily(ValueError):
    """A model of a family the engine asked for does not run (the message says which do)."""


@dataclass(frozen=True)
class FromConfig:
    """A decision the base config makes: its field `name` (`default` when absent or None)."""

    name: str
    default: Any = None

    def read(self, config) -> Any:
        value = getattr(config, self.name, None)
        return self.default if value is None else value


def _decide(value, config) -> Any:
    return value.read(config) if isinstance(value, FromConfig) else value


@dataclass(frozen=True, eq=False)
class Family:
    """One base family: what cqil does differently for it (docs/runtime.md, families)."""

    model_type: str  # transformers' model_type, e.g. of config.json
    name: str  # for people
    config_class: str  # transformers' config class
    module: str  # transformers.models.<module>.modeling_<module>
    # Projections: a bool, or FromConfig naming the base config field that decides.
    qkv_bias: bool | FromConfig = False  # q/k/v biases
    out_bias: bool | FromConfig = False  # o_proj bias
    mlp_bias: bool | FromConfig = False  # gate/up/down biases
    fused_projections: bool = False  # one qkv_proj and one gate_up_proj per layer (Phi-3)
    qk_norm: str | None = None  # "per_head": an RMSNorm over each head of q and k
    # Norms and scales.
    norms: str = "pre"  # "pre": input, pre-MLP; "sandwich": also after attention and MLP (Gemma)
    norm_unit_offset: bool = False  # RMSNorms scale by (1 + weight), in fp32 (Gemma)
    norm_fp32_gain: bool = False  # RMSNorms multiply their weight in fp32, then cast (OLMo 2)
    embedding_scale: str | None = None  # SQRT_HIDDEN (Gemma)
    # Granite's multipliers (FromConfig): embeddings ×, each layer's two deltas ×, the attention
    # scores' scale (instead of head_dim^-1/2), logits ÷
    embedding_multiplier: FromConfig | None = None
    residual_multiplier: FromConfig | None = None
    attention_multiplier: FromConfig | None = None
    logits_scaling: FromConfig | None = None
    attention_scale: FromConfig | None = None  # scores × field^-1/2 (None: head_dim^-1/2)
    attn_softcap: FromConfig | None = None  # cap · tanh(scores / cap) (Gemma 2)
    final_softcap: FromConfig | None = None  # cap · tanh(logits / cap)
    # RoPE (computed from the config's rope_parameters by families_cqil.make_rotary).
    partial_rope: bool = False  # on the first head_dim × partial_rotary_factor channels
    local_rope: bool = False  # one RoPE per layer type: a local base on sliding layers
    engines: frozenset = frozenset(ENGINES)
    # GGUF: what transformers' GGUF reader leaves at the config's defaults and cqil completes
    # from the file (names of GGUF_COMPLETIONS); the layer count of the model whose queries
    # llama.cpp scales by (hidden / heads)^-1/2 instead of head_dim^-1/2 (the 27B ones).
    gguf: tuple = ()
    gguf_wide_scale_layers: int | None = None
    # Tiny examples: kind -> transformers config settings beyond TINY_SIZES, each with the
    # family's odd shapes (GQA, one kv head, odd layer counts); the first is the family's own.
    examples: Mapping = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = {"norms": self.norms not in NORMS, "qk_norm": self.qk_norm not in QK_NORMS,
                   "embedding_scale": self.embedding_scale not in (None, SQRT_HIDDEN),
                   # the reference engine defines the computation: every family has it
                   "engines": not {"reference"} <= set(self.engines) <= set(ENGINES),
                   "gguf": not set(self.gguf) <= set(GGUF_COMPLETIONS),
                   "examples": not self.examples}
        bad = [f"{name} {getattr(self, name)!r}" for name, wrong in unknown.items() if wrong]
        if bad:
            raise ValueError(f"family {self.model_type}: {', '.join(bad)} (not implemented, "
                             "or no tiny example)")
        object.__setattr__(self, "examples", MappingProxyType(
            {kind: MappingProxyType(dict(settings)) for kind, settings in self.examples.items()}))

    def config_fields(self, config) -> dict:
        """The CqilConfig fields this family decides, for the base config `config`."""
        return dict(
            attention_bias=bool(_decide(self.qkv_bias, config)),
            attention_out_bias=bool(_decide(self.out_bias, config)),
            mlp_bias=bool(_decide(self.mlp_bias, config)),
            qk_norm=self.qk_norm is not None,
            qk_norm_whole=self.qk_norm == "projection",
            norm_unit_offset=self.norm_unit_offset,
            norm_fp32_gain=self.norm_fp32_gain,
            input_norms=self.norms != "post",
            post_norms=self.norms in ("sandwich", "post"),
            embedding_multiplier=_decide(self.embedding_multiplier, config),
            residual_multiplier=_decide(self.residual_multiplier, config),
            attention_multiplier=_decide(self.attention_multiplier, config),
            logits_scaling=_decide(self.logits_scaling, config),
            scale_embeddings=self.embedding_scale == SQRT_HIDDEN,
            query_pre_attn_scalar=_decide(self.attention_scale, config),
            attn_logit_softcapping=_decide(self.attn_softcap, config),
            final_logit_softcapping=_decide(self.final_softcap, config),
            fused_projections=self.fused_projections,
        )


_ATTENTION_BIAS = FromConfig("attention_bias", False)
_GEMMA = dict(norms="sandwich", norm_unit_offset=True, embedding_scale=SQRT_HIDDEN,
              qkv_bias=_ATTENTION_BIAS, out_bias=_ATTENTION_BIAS,
              attention_scale=FromConfig("query_pre_attn_scalar"),
              final_softcap=FromConfig("final_logit_softcapping"))

_ROWS = (
    Family("llama", "Llama", "LlamaConfig", "llama",
           qkv_bias=_ATTENTION_BIAS, out_bias=_ATTENTION_BIAS,
           mlp_bias=FromConfig("mlp_bias", False),
           examples={
               # grouped-query attention (4 heads / 2 kv heads), odd layer count, tied embeddings
               "llama-gqa": dict(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True),
               # every optional bias (q/k/v/o and MLP)
               "llama-bias": dict(num_hidden_layers=5, num_attention_heads=4,
                                  num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                                  tie_word_embeddings=False)}),
    Family("mistral", "Mistral", "MistralConfig", "mistral",
           examples={
               # a single kv head and a sliding window shorter than the test sequences
               "mistral-one-kv": dict(num_hidden_layers=7, num_attention_heads=4,
                                      num_key_value_heads=1, sliding_window=6,
                                      tie_word_embeddings=False)}),
    Family("qwen2", "Qwen2", "Qwen2Config", "qwen2", qkv_bias=True,
           examples={
               # q/k/v biases
               "qwen2-bias": dict(num_hidden_layers=5, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=False)}),
    Family("qwen3", "Qwen3", "Qwen3Config", "qwen3", qkv_bias=_ATTENTION_BIAS,
           out_bias=_ATTENTION_BIAS, qk_norm="per_head",
           examples={
               # per-head q/k RMSNorm, head_dim independent of hidden size / heads, one kv head
               "qwen3-qknorm": dict(num_hidden_layers=7, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=32,
                                    tie_word_embeddings=True)}),
    Family("gemma2", "Gemma 2", "Gemma2Config", "gemma2", **_GEMMA,
           attn_softcap=FromConfig("attn_logit_softcapping"),
           gguf=("query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping"),
           gguf_wide_scale_layers=46,
           examples={
               # alternating sliding (window 6) / global layers from layer 0, a scale that is not
               # head_dim's, attention and final logit soft-caps small enough to bite, tied
               "gemma2-softcap": dict(num_hidden_layers=5, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, sliding_window=6,
                                      query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                      final_logit_softcapping=3.0, tie_word_embeddings=True)}),
    # Gemma 3 keeps attn_logit_softcapping in its config, but its attention never applies it.
    Family("gemma3_text", "Gemma 3 (text)", "Gemma3TextConfig", "gemma3", **_GEMMA,
           qk_norm="per_head", local_rope=True,
           gguf=("query_pre_attn_scalar", "final_logit_softcapping", "rope_parameters"),
           gguf_wide_scale_layers=62,
           examples={
               # per-head q/k norms, one kv head, two RoPEs (local base on the sliding layers, a
               # linearly scaled global base on the others), a window of 6, untied head
               "gemma3-local": dict(
                   num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1,
                   head_dim=32, sliding_window=6, query_pre_attn_scalar=20,
                   tie_word_embeddings=False, final_logit_softcapping=None,
                   layer_types=[_SLIDING, _SLIDING, _FULL, _SLIDING, _SLIDING, _FULL, _SLIDING],
                   rope_parameters={_SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                                    _FULL: {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000000.0}})}),
    Family("phi3", "Phi-3", "Phi3Config", "phi3", fused_projections=True, partial_rope=True,
           gguf=("partial_rotary_factor", "sliding_window"),
           examples={
               # fused qkv_proj / gate_up_proj, partial rotary (half of head_dim 16), window 8
               "phi3-partial": dict(num_hidden_layers=5, num_attention_heads=4,
                                    num_key_value_heads=2, partial_rotary_factor=0.5,
                                    sliding_window=8, tie_word_embeddings=False)}),
    # transformers reads neither family from GGUF files: no gguf completions.
    Family("granite", "Granite", "GraniteConfig", "granite",
           qkv_bias=_ATTENTION_BIAS, out_bias=_ATTENTION_BIAS,
           mlp_bias=FromConfig("mlp_bias", False),
           embedding_multiplier=FromConfig("embedding_multiplier"),
           residual_multiplier=FromConfig("residual_multiplier"),
           attention_multiplier=FromConfig("attention_multiplier"),
           logits_scaling=FromConfig("logits_scaling"),
           examples={
               # every multiplier far from 1 (transformers' defaults are 1), GQA, odd layers
               "granite-multipliers": dict(num_hidden_layers=5, num_attention_heads=4,
                                           num_key_value_heads=2, embedding_multiplier=3.0,
                                           residual_multiplier=0.4, attention_multiplier=0.09,
                                           logits_scaling=2.5, tie_word_embeddings=True)}),
    Family("olmo2", "OLMo 2", "Olmo2Config", "olmo2",
           qkv_bias=_ATTENTION_BIAS, out_bias=_ATTENTION_BIAS,
           norms="post", norm_fp32_gain=True, qk_norm="projection",
           examples={
               # norms after attention and MLP only, q/k norms over the whole projection with
               # one kv head, odd layer count, untied head
               "olmo2-postnorm": dict(num_hidden_layers=5, num_attention_heads=4,
                                      num_key_value_heads=1, tie_word_embeddings=False)}),
)
FAMILIES: Mapping[str, Family] = MappingProxyType({row.model_type: row for row in _ROWS})
MODEL_TYPES = tuple(FAMILIES)
EXAMPLES: Mapping[str, Family] = MappingProxyType(
    {kind: row for row in _ROWS for kind in row.examples})  # tiny example kind -> its row


# ----------------------------------------------------------------------------- the one check


def _field(model, name: str):
    if isinstance(model, Mapping):
        return model.get(name)
    return getattr(model, name, None)


def _converted(model) -> bool:
    """A config (or its dict) of a converted folder; a string is always a base model_type."""
    return not isinstance(model, str) and model is not None and _field(model, "model_type") == "cqil"


def base_type(model) -> str | None:
    """The base model_type of `model`: a model_type string (taken as is: a base model), a
    config, or a config's dict; a converted one (model_type "cqil") gives its base_model_type."""
    if model is None or isinstance(model, str):
        return model
    return _field(model, "base_model_type" if _converted(model) else "model_type")


def families_for(engine: str) -> tuple[str, ...]:
    """The model_types `engine` runs, in table order."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine '{engine}' (one of {', '.join(ENGINES)})")
    return tuple(kind for kind, row in FAMILIES.items() if engine in row.engines)


def require_engine(model, engine: str, what: str) -> Family:
    """The row of `model` (see base_type) when `engine` runs it, else UnsupportedFamily:
    "WHAT is 'gpt2'; ENGINE runs the families llama, ... and folders converted from them"."""
    names = families_for(engine)
    base = base_type(model)
    if base in names:
        return FAMILIES[base]
    desc = f"converted from '{base}'" if _converted(model) else f"'{base}'"
    raise UnsupportedFamily(f"{what} is {desc}; {ENGINE_TITLES[engine]} runs the families "
                            f"{', '.join(names)} and folders converted from them")


def runs_on(model, engine: str) -> bool:
    """Whether `engine` runs `model` (require_engine's check, as a bool)."""
    return base_type(model) in families_for(engine)


def family_of(model_type: str | None) -> Family:
    """The row of a base model_type (every row runs on the reference engine); UnsupportedFamily
    otherwise."""
    return require_engine(model_type, "reference", "the model")


# ----------------------------------------------------------------------------- tiny examples


def tiny_config(kind: str, **overrides) -> tuple[str, dict]:
    """(transformers config class name, settings) of the tiny example `kind` (EXAMPLES):
    TINY_SIZES, the example's settings, then overrides. A num_hidden_layers override repeats
    or cuts an explicit layer_types pattern to that many layers."""
    row = EXAMPLES[kind]
    settings = {**TINY_SIZES, **copy.deepcopy(dict(row.examples[kind])), **overrides}
    types = settings.get("layer_types")
    if types and "layer_types" not in overrides and len(types) != settings["num_hidden_layers"]:
        settings["layer_types"] = [types[i % len(types)] for i in range(settings["num_hidden_layers"])]
    return row.config_class, settings


__all__ = ["ENGINES", "EXAMPLES", "FAMILIES", "MODEL_TYPES", "Family", "FromConfig",
           "UnsupportedFamily", "base_type", "families_for", "family_of", "require_engine",
           "runs_on", "tiny_config"]
