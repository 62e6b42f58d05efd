"""Configuration of a CQIL-converted model (model_type "cqil") of a family of
family_table_cqil.py (what each family turns on: Family.config_fields).

Self-contained on purpose (torch, transformers, the standard library and family_table_cqil.py
only): `cqil convert`
copies it next to the converted weights with the other runtime files, so that
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` works where cqil is not
installed. The grouping it carries is explained in modeling_cqil.py and docs/runtime.md.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from .family_table_cqil import MODEL_TYPES, require_engine
from .quant_cqil import WeightScheme

SUPPORTED_BASE_TYPES = MODEL_TYPES  # the table's base model_types (its older name)
ENGINES = ("fused", "reference")
SLIDING = "sliding_attention"
FULL = "full_attention"


# ----------------------------------------------------------------------------- configuration


def check_groups(groups: Any, num_layers: int) -> list[list[int]]:
    """Validate a list of steps and return it as plain lists of ints.

    Steps must be non-empty runs of consecutive layer indices that together cover
    0..num_layers-1 exactly once, in order.
    """
    if not isinstance(groups, (list, tuple)):
        raise ValueError(f"groups must be a list of lists of layer indices, got {type(groups).__name__}")
    steps: list[list[int]] = []
    expected = 0
    for step in groups:
        if not isinstance(step, (list, tuple)) or len(step) == 0:
            raise ValueError(f"each step in groups must be a non-empty list of layer indices, got {step!r}")
        step = [int(i) for i in step]
        if step != list(range(step[0], step[0] + len(step))):
            raise ValueError(f"step {step} is not a run of consecutive layers")
        if step[0] != expected:
            raise ValueError(
                f"step {step} should start at layer {expected}: steps must cover layers "
                f"0..{num_layers - 1} once each, in order"
            )
        expected = step[-1] + 1
        steps.append(step)
    if expected != num_layers:
        raise ValueError(f"groups cover layers 0..{expected - 1} but the model has {num_layers} layers")
    return steps


class CqilConfig(PreTrainedConfig):
    r"""Configuration of a CQIL-converted model.

    It carries the base model's fields flat (so the usual names `hidden_size`,
    `num_hidden_layers`, ... mean what they mean in the base config) plus:

    base_model_type (`str`): a model_type of family_table_cqil.py (the architecture converted).
    groups (`list[list[int]]`): the ordered steps; size-1 lists are single layers.
        None means every layer is its own step (the original model).
    bypass_distance (`int`): D >= 0, how many earlier layers of its group feed a layer's MLP.
    skip_layers (`list[int]`): layers the prompt runs through but decoded tokens skip
        (Unified Layer Skipping); each must be its own step, and layer 0 always runs.
    engine (`str`): "fused" (default, inference) or "reference".
    weights (`dict`): None (dense linears), or how the linears are quantized
        (quant_cqil.WeightScheme.to_json(): format int8 | int4, group_size, head, method).
    attention_bias / attention_out_bias / mlp_bias / qk_norm: which optional tensors the
        layers have (q/k/v bias, o_proj bias, MLP biases, per-head q/k RMSNorm of qwen3 and
        gemma3).
    What the Gemma and Phi-3 families add (all off for the Llama family; families_cqil.py;
    from_base_config sets them from the family's row, family_table_cqil.Family.config_fields):
    norm_unit_offset (`bool`): RMSNorms scale by (1 + weight), in fp32 (Gemma).
    post_norms (`bool`): four norms per layer: input, post-attention (on the attention output),
        pre-feedforward (the MLP input), post-feedforward (on the MLP output) (Gemma).
    scale_embeddings (`bool`): embeddings times sqrt(hidden_size), in their dtype (Gemma).
    query_pre_attn_scalar (`float`): attention scores scaled by its -1/2 power, not head_dim's.
    attn_logit_softcapping / final_logit_softcapping (`float`): cap * tanh(s / cap) of the
        attention scores (Gemma 2) / of the logits (Gemma 2, Gemma 3 when set).
    fused_projections (`bool`): one qkv_proj and one gate_up_proj per layer (Phi-3).
    What OLMo 2 adds: input_norms (`bool`, default True): False = no input and no MLP-input norm
        (with post_norms: the post-attention and post-feedforward norms only); norm_fp32_gain
        (`bool`): RMSNorms multiply their weight in fp32, then cast; qk_norm_whole (`bool`): the
        q/k norms span the whole projection ([heads * head_dim]) instead of each head.
    What Granite adds: embedding_multiplier (embeddings times it), residual_multiplier (each
        layer's two deltas times it), attention_multiplier (the attention scores' scale, instead
        of head_dim^-1/2), logits_scaling (logits divided by it); all `float` or None.
    rope_parameters may hold one dict per layer type (Gemma 3: a local base for the sliding
    layers, the global base and its scaling for the others).
    """

    model_type = "cqil"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_unit_offset: bool = False
    post_norms: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    fused_projections: bool = False
    embedding_multiplier: float | None = None  # Granite's four
    residual_multiplier: float | None = None
    attention_multiplier: float | None = None
    logits_scaling: float | None = None
    input_norms: bool = True  # OLMo 2's three
    norm_fp32_gain: bool = False
    qk_norm_whole: bool = False
    attention_dropout: float | int = 0.0
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    base_model_type: str = MODEL_TYPES[0]  # the first family of the table (Llama)
    groups: list[list[int]] | None = None
    bypass_distance: int = 0
    skip_layers: list[int] | None = None
    engine: str = "fused"
    weights: dict | None = None  # quant_cqil.WeightScheme.to_json(): int8 / int4 linears

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        require_engine(self.base_model_type, "reference", "base_model_type")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.groups is None:
            self.groups = [[i] for i in range(self.num_hidden_layers)]
        self.groups = check_groups(self.groups, self.num_hidden_layers)
        if isinstance(self.bypass_distance, bool) or int(self.bypass_distance) != self.bypass_distance:
            raise ValueError(f"bypass_distance must be an integer, got {self.bypass_distance!r}")
        self.bypass_distance = int(self.bypass_distance)
        if self.bypass_distance < 0:
            raise ValueError(f"bypass_distance must be >= 0, got {self.bypass_distance}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got '{self.engine}'")
        if self.layer_types is None:
            kind = SLIDING if self.sliding_window is not None else FULL
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must have one entry per layer")
        for t in self.layer_types:
            if t not in (FULL, SLIDING):
                raise ValueError(f"layer type '{t}' is not supported (only {FULL}, {SLIDING})")
            if t == SLIDING and self.sliding_window is None:
                raise ValueError("a sliding_attention layer needs sliding_window to be set")
        if self.weights is not None:
            WeightScheme.from_json(self.weights)  # a ValueError for an unknown format
        self.skip_layers = sorted({int(i) for i in (self.skip_layers or [])})
        grouped = {i for step in self.groups if len(step) > 1 for i in step}
        for i in self.skip_layers:
            if not 0 < i < self.num_hidden_layers:
                raise ValueError(f"skip_layers: layer {i} is out of range 1..{self.num_hidden_layers - 1} "
                                 "(layer 0 always runs: it sets the cache length)")
            if i in grouped:
                raise ValueError(f"skip_layers: layer {i} is in a group; only single layers can be skipped")
        super().__post_init__(**kwargs)

    @property
    def num_steps(self) -> int:
        return len(self.groups)

    @classmethod
    def from_base_config(
        cls, base_config: PreTrainedConfig, groups: list[list[int]] | None, bypass_distance: int = 0, **kwargs
    ) -> CqilConfig:
        """Build a CqilConfig from a transformers config of a family of family_table_cqil.py
        (the fields its row decides: Family.config_fields)."""
        c = base_config
        kind = getattr(c, "model_type", None)
        family = require_engine(kind, "reference", "the base model")
        if getattr(c, "use_bidirectional_attention", False):
            raise ValueError(f"{kind} with use_bidirectional_attention is not a causal LM; cqil cannot convert it")
        n = c.num_hidden_layers
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        hidden_act = getattr(c, "hidden_act", None) or getattr(c, "hidden_activation", None) or "silu"
        sliding_window = getattr(c, "sliding_window", None)
        layer_types = getattr(c, "layer_types", None)
        if layer_types is not None:
            layer_types = list(layer_types)
            if SLIDING not in layer_types:
                sliding_window = None
        rope = getattr(c, "rope_parameters", None)
        if rope is not None:  # one level deeper for per-layer-type RoPE (Gemma 3)
            rope = {k: dict(v) if isinstance(v, dict) else v for k, v in rope.items()}
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=n,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            hidden_act=hidden_act,
            max_position_embeddings=c.max_position_embeddings,
            initializer_range=getattr(c, "initializer_range", 0.02),
            rms_norm_eps=c.rms_norm_eps,
            use_cache=getattr(c, "use_cache", True),
            pad_token_id=getattr(c, "pad_token_id", None),
            bos_token_id=getattr(c, "bos_token_id", None),
            eos_token_id=getattr(c, "eos_token_id", None),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            rope_parameters=rope,
            **family.config_fields(c),
            attention_dropout=getattr(c, "attention_dropout", 0.0) or 0.0,
            sliding_window=sliding_window,
            layer_types=layer_types,
            base_model_type=kind,
            groups=groups,
            bypass_distance=bypass_distance,
            **kwargs,
        )


__all__ = ["CqilConfig", "check_groups", "SUPPORTED_BASE_TYPES", "ENGINES", "FULL", "SLIDING"]
