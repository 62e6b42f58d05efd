"""CQIL runtime for Llama-family decoders (llama, mistral, qwen2, qwen3).

This file is self-contained on purpose: it imports only torch, transformers and the standard
library, so `cqil convert` copies it next to the converted weights and
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` works where cqil is not
installed.

The method (design.md §2). The layers are partitioned into ordered *steps*; a step is a single
layer or a group G = [l_0, ..., l_{P-1}] of adjacent layers that all read the same input x:

    a_j = A_j(N1_j(x))                                  attention, all on the same x
    b_j = sum_{k=max(0, j-D)}^{j-1} beta_{j,k} * a_k    bypass, distance D (D = 0: none)
    m_j = F_j(N2_j(x + a_j + b_j))                      MLP sees its own attention + bypass
    y   = x + sum_j gamma_j * (a_j + m_j)

A single layer is the original layer: h = x + A(N1(x)); y = h + F(N2(h)).

Checkpoint names are the base model's (`model.layers.N.self_attn.q_proj.weight`, ...) plus, on
grouped layers only:
    model.layers.N.cqil_gamma   (hidden,)        gamma_j of layer N = l_j
    model.layers.N.cqil_beta    (D', hidden)     D' = min(j, D); row r holds beta_{j, j-D'+r},
                                                 i.e. rows run over the D' preceding layers of
                                                 the group, oldest first.
All of them are initialised to 1 (the untrained group is the authors' concurrent computation).

KV cache: one cache entry per step (not per layer). A step's entry holds P * num_key_value_heads
heads, layer-major (heads of l_0 first), because each layer keeps its own keys and values. Both
engines use this layout, so a cache filled by one can be continued by the other.

Engines (one semantics):
  reference  plain per-layer PyTorch, the readable definition; differentiable (training).
  fused      inference: each group runs as one wide layer (shared RMSNorm statistics with the
             N1 weights folded into one q/k/v matrix, one attention call over P*heads, batched
             o_proj and gate/up, one down projection with gamma folded in). Fused weights are
             derived from the parameters lazily and rebuilt when a parameter changes.
The fused engine is used only for inference (eval mode and torch.no_grad()); otherwise the
reference engine runs, so gradients always flow to the real parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as hf_init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

SUPPORTED_BASE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ENGINES = ("fused", "reference")
_SLIDING = "sliding_attention"
_FULL = "full_attention"


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
    r"""Configuration of a CQIL-converted Llama-family model.

    It carries the base model's fields flat (so the usual names `hidden_size`,
    `num_hidden_layers`, ... mean what they mean in the base config) plus:

    base_model_type (`str`): llama, mistral, qwen2 or qwen3 (the architecture converted).
    groups (`list[list[int]]`): the ordered steps; size-1 lists are single layers.
        None means every layer is its own step (the original model).
    bypass_distance (`int`): D >= 0, how many earlier layers of its group feed a layer's MLP.
    engine (`str`): "fused" (default, inference) or "reference".
    attention_bias / attention_out_bias / mlp_bias / qk_norm: which optional tensors the
        layers have (q/k/v bias, o_proj bias, MLP biases, per-head q/k RMSNorm of qwen3).
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
    attention_dropout: float | int = 0.0
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    base_model_type: str = "llama"
    groups: list[list[int]] | None = None
    bypass_distance: int = 0
    engine: str = "fused"

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.base_model_type not in SUPPORTED_BASE_TYPES:
            raise ValueError(
                f"base_model_type '{self.base_model_type}' is not supported; "
                f"supported: {', '.join(SUPPORTED_BASE_TYPES)}"
            )
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
            kind = _SLIDING if self.sliding_window is not None else _FULL
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must have one entry per layer")
        for t in self.layer_types:
            if t not in (_FULL, _SLIDING):
                raise ValueError(f"layer type '{t}' is not supported (only {_FULL}, {_SLIDING})")
            if t == _SLIDING and self.sliding_window is None:
                raise ValueError("a sliding_attention layer needs sliding_window to be set")
        for step in self.groups:
            if len({self.layer_types[i] for i in step}) > 1:
                # One attention call covers the whole group, so it needs one mask.
                raise ValueError(f"group {step} mixes full and sliding-window attention layers")
        super().__post_init__(**kwargs)

    @property
    def num_steps(self) -> int:
        return len(self.groups)

    @classmethod
    def from_base_config(
        cls, base_config: PreTrainedConfig, groups: list[list[int]] | None, bypass_distance: int = 0, **kwargs
    ) -> CqilConfig:
        """Build a CqilConfig from a transformers Llama/Mistral/Qwen2/Qwen3 config."""
        kind = getattr(base_config, "model_type", None)
        if kind not in SUPPORTED_BASE_TYPES:
            raise ValueError(
                f"cqil supports the architectures {', '.join(SUPPORTED_BASE_TYPES)}; got model_type '{kind}'"
            )
        c = base_config
        n = c.num_hidden_layers
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        hidden_act = getattr(c, "hidden_act", "silu")
        if kind == "llama":
            qkv_bias = out_bias = bool(getattr(c, "attention_bias", False))
            mlp_bias = bool(getattr(c, "mlp_bias", False))
        elif kind == "mistral":
            qkv_bias = out_bias = mlp_bias = False
        elif kind == "qwen2":
            qkv_bias, out_bias, mlp_bias = True, False, False
        else:  # qwen3
            qkv_bias = out_bias = bool(getattr(c, "attention_bias", False))
            mlp_bias = False
        sliding_window = getattr(c, "sliding_window", None)
        layer_types = getattr(c, "layer_types", None)
        if layer_types is not None:
            layer_types = list(layer_types)
            if _SLIDING not in layer_types:
                sliding_window = None
        rope = getattr(c, "rope_parameters", None)
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
            rope_parameters=dict(rope) if rope is not None else None,
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            mlp_bias=mlp_bias,
            qk_norm=kind == "qwen3",
            attention_dropout=getattr(c, "attention_dropout", 0.0) or 0.0,
            sliding_window=sliding_window,
            layer_types=layer_types,
            base_model_type=kind,
            groups=groups,
            bypass_distance=bypass_distance,
            **kwargs,
        )


# ----------------------------------------------------------------------------- modules


class CqilRMSNorm(nn.Module):
    """RMSNorm exactly as transformers' Llama computes it (statistics in fp32)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CqilAttention(nn.Module):
    """Attention of one layer; module names match the base checkpoint."""

    def __init__(self, config: CqilConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.dropout = float(config.attention_dropout)
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = CqilRMSNorm(hd, eps=config.rms_norm_eps)
            self.k_norm = CqilRMSNorm(hd, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h [B, T, d] (already normed) -> q [B, H, T, hd], k and v [B, G, T, hd] (RoPE applied)."""
        B, T, _ = h.shape
        q = self.q_proj(h).view(B, T, -1, self.head_dim)
        k = self.k_proj(h).view(B, T, -1, self.head_dim)
        v = self.v_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # qwen3 normalises each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B|1, 1, T, hd]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def attend(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        """q [B, H, T, hd], k/v [B, G, S, hd] -> attention output after o_proj [B, T, d]."""
        B, _, T, _ = q.shape
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [B, H, T, hd]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class CqilMLP(nn.Module):
    def __init__(self, config: CqilConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(d, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, d, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class CqilDecoderLayer(nn.Module):
    """One base layer plus, when it sits in a group, its gamma and beta vectors."""

    def __init__(self, config: CqilConfig, layer_idx: int, group_pos: int, group_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = CqilAttention(config)
        self.mlp = CqilMLP(config)
        self.input_layernorm = CqilRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = CqilRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        d = config.hidden_size
        n_beta = min(group_pos, config.bypass_distance) if group_size > 1 else 0
        # gamma_j scales this layer's contribution; beta rows weight the n_beta previous a_k.
        self.cqil_gamma = nn.Parameter(torch.ones(d)) if group_size > 1 else None
        self.cqil_beta = nn.Parameter(torch.ones(n_beta, d)) if n_beta > 0 else None


# ----------------------------------------------------------------------------- masks


def build_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, past: int,
    sliding_window: int | None, device: torch.device,
) -> tuple[torch.Tensor | None, bool]:
    """Return (bool mask [B|1, 1, q_len, past+q_len] or None, is_causal) for SDPA.

    Query i sits at cache position past+i. True = may attend. Keys are cache positions, so a
    sliding window counts cache slots like transformers does. The diagonal is always allowed:
    a left-padding query would otherwise have no key at all, and SDPA would return NaN there,
    which then leaks into every row through 0 * NaN in the value product.
    """
    kv_len = past + q_len
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2D [batch, past + new tokens] (1 = token, 0 = padding)")
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions, expected {kv_len} "
                f"({past} cached + {q_len} new)"
            )
        if bool(attention_mask.all()):
            attention_mask = None
    windowed = sliding_window is not None and kv_len > sliding_window
    if attention_mask is None and not windowed:
        if q_len == 1:
            return None, False  # one query sees the whole cache
        if past == 0:
            return None, True  # plain causal prefill: let SDPA pick its causal kernel
    q_pos = torch.arange(past, kv_len, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1, S]
    allowed = k_pos <= q_pos
    if windowed:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    allowed = allowed[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return allowed | (k_pos == q_pos), False


# ----------------------------------------------------------------------------- engines


def reference_step(layers, x, cos, sin, mask, is_causal, cache, step_idx) -> torch.Tensor:
    """One step (a single layer or a group), written as the definition in design.md §2.

    x [B, T, d] -> y [B, T, d]. `cache` is any object with transformers' Cache.update signature.
    """
    P = len(layers)
    projected = [ly.self_attn.project(ly.input_layernorm(x), cos, sin) for ly in layers]
    qs = [p[0] for p in projected]
    ks = [p[1] for p in projected]
    vs = [p[2] for p in projected]
    if cache is not None:
        # One cache entry per step: the P layers' heads, layer-major.
        k_all, v_all = cache.update(torch.cat(ks, dim=1), torch.cat(vs, dim=1), step_idx)
        ks, vs = k_all.chunk(P, dim=1), v_all.chunk(P, dim=1)
    a = [ly.self_attn.attend(q, k, v, mask, is_causal) for ly, q, k, v in zip(layers, qs, ks, vs, strict=True)]
    if P == 1:  # the original layer, in the original order of additions
        layer = layers[0]
        h = x + a[0]
        return h + layer.mlp(layer.post_attention_layernorm(h))
    y = x
    for j, layer in enumerate(layers):
        z = a[j]  # a_j + b_j
        if layer.cqil_beta is not None:
            n_beta = layer.cqil_beta.shape[0]
            for r in range(n_beta):
                z = z + layer.cqil_beta[r] * a[j - n_beta + r]
        m = layer.mlp(layer.post_attention_layernorm(x + z))
        y = y + layer.cqil_gamma * (a[j] + m)
    return y


def _store_in_out(weight_dtype: torch.dtype, device: torch.device, n_in: int, n_out: int) -> bool:
    """Whether a dense fused matrix should be stored [in, out] (else [out, in], transposed on use).

    Measured on a 2-core AMD EPYC with MKL: for one-token matmuls in fp32, [in, out] streams
    the weights about 2x faster when the output is wider than the input (q/k/v, gate/up,
    lm_head), while [out, in] is faster for the narrow down projection. GPUs do not care.
    """
    return device.type == "cpu" and weight_dtype == torch.float32 and n_out > n_in


def _matrix(w_out_in: torch.Tensor) -> torch.Tensor:
    """A weight [out, in] as the [in, out] right operand of mm, in the faster layout."""
    out_dim, in_dim = w_out_in.shape
    if _store_in_out(w_out_in.dtype, w_out_in.device, in_dim, out_dim):
        return w_out_in.t().contiguous()  # [in, out] contiguous
    return w_out_in.contiguous().t()  # [in, out] view of [out, in]


_PACKED_OK: bool | None = None


def _packed_bf16_available() -> bool:
    """Whether oneDNN's prepacked linear (what inductor uses for bf16 on CPU) works here.

    bf16 matmuls through the generic path are bound by the bf16 -> fp32 conversion on CPUs
    (no faster than fp32); oneDNN's prepacked weights run ~1.6x faster at one token.
    """
    global _PACKED_OK
    if _PACKED_OK is None:
        try:
            ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            if ok:
                w = torch.randn(8, 16, dtype=torch.bfloat16)
                x = torch.randn(3, 16, dtype=torch.bfloat16)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
                y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                ok = bool(torch.allclose(y.float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2))
        except Exception:  # private API: any failure means "use the dense path"
            ok = False
        _PACKED_OK = ok
    return _PACKED_OK


class FusedLinear:
    """y = x W^T (+ bias) (+ add) for 2D x [N, in], with the weight stored for speed.

    cpu/bf16: oneDNN prepacked weight; cpu/fp32: dense in the faster layout (_matrix);
    elsewhere: dense. `add` (e.g. the residual) is fused into the matmul where the kernel allows.
    """

    @staticmethod
    def packs(w: torch.Tensor) -> bool:
        return w.device.type == "cpu" and w.dtype == torch.bfloat16 and _packed_bf16_available()

    def __init__(self, w_out_in: torch.Tensor, bias: torch.Tensor | None = None):
        self.packed = self.packs(w_out_in)
        if self.packed:
            self.w = torch.ops.mkldnn._reorder_linear_weight(w_out_in.contiguous(), 1)
        else:
            self.w = _matrix(w_out_in)  # [in, out]
        self.bias = bias

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed:
            if add is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.w, self.bias, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(x, add, self.w, self.bias, "add")
        base = add
        if self.bias is not None:
            base = self.bias if add is None else add + self.bias
        return torch.mm(x, self.w) if base is None else torch.addmm(base, x, self.w)


def _batched(ws: list[torch.Tensor]) -> torch.Tensor:
    """P weights [out, in] -> [P, in, out] operand of bmm, in the faster layout."""
    out_dim, in_dim = ws[0].shape
    if _store_in_out(ws[0].dtype, ws[0].device, in_dim, out_dim):
        return torch.stack([w.t() for w in ws]).contiguous()
    return torch.stack(ws).contiguous().transpose(1, 2)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B|1, T, hd] -> the fused engine's form [B|1, T, 1, hd], with sin sign-folded.

    rotate_half(x) * sin == roll(x, hd/2) * [-sin_1, sin_2], so RoPE is 3 ops: mul, roll, addcmul.
    """
    half = sin.shape[-1] // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos.unsqueeze(2), signed.unsqueeze(2)


class FusedStep:
    """Inference weights of one step, derived from its layers' parameters, and its forward.

    P layers, H heads, G kv heads, hd head dim, d hidden, I intermediate (shapes as [out, in]):
      qkv    FusedLinear [P*(H+2G)*hd, d]  rows: q of l_0..l_{P-1}, then k of all, then v of
             all; N1_j weight folded into layer j's columns (x is normed once for the group)
      qk_norm_w [P*(H+G), hd]  per-head q/k norm weights (qwen3), same head order
      single layer (P == 1): o [d, H*hd], gu [2I, d] (N2 folded), down [d, I]
      group (P > 1): o_j [d, H*hd] and gu_j [2I, d] (N2_j folded) per layer, either batched
             for bmm (w_o [P, H*hd, d], w_gu [P, d, 2I]) or as P FusedLinears (prepacked bf16);
             down [d, P*I] with gamma_j folded into layer j's columns, gamma [P, 1, d],
             mix [P, P, 1, d] (a_j + b_j = sum_k mix[j, k] * a_k)
    """

    def __init__(self, layers, config: CqilConfig):
        L = layers
        self.P = P = len(L)
        self.H, self.G, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.eps = config.rms_norm_eps
        self.silu = config.hidden_act in ("silu", "swish")
        self.act = ACT2FN[config.hidden_act]
        self.nq, self.nqk = P * self.H, P * (self.H + self.G)  # head counts before k, before v
        self.gqa = self.H != self.G
        dtype = L[0].self_attn.q_proj.weight.dtype
        f32 = torch.float32

        def fold(lin: nn.Linear, norm: CqilRMSNorm) -> torch.Tensor:  # W diag(n): [out, in], fp32
            return lin.weight.to(f32) * norm.weight.to(f32)[None, :]

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype)

        att = [ly.self_attn for ly in L]
        w = [fold(a.q_proj, ly.input_layernorm) for a, ly in zip(att, L, strict=True)]
        w += [fold(a.k_proj, ly.input_layernorm) for a, ly in zip(att, L, strict=True)]
        w += [fold(a.v_proj, ly.input_layernorm) for a, ly in zip(att, L, strict=True)]
        b = None
        if att[0].q_proj.bias is not None:
            b = torch.cat([a.q_proj.bias for a in att] + [a.k_proj.bias for a in att] + [a.v_proj.bias for a in att])
        self.qkv = FusedLinear(cast(torch.cat(w)), b)
        self.qk_norm_w = None
        if att[0].q_norm is not None:
            qn = [a.q_norm.weight[None].expand(self.H, -1) for a in att]
            kn = [a.k_norm.weight[None].expand(self.G, -1) for a in att]
            self.qk_norm_w = torch.cat(qn + kn).contiguous()  # [P*(H+G), hd]

        def gate_up(ly) -> torch.Tensor:  # [2I, d], N2 folded
            n2 = ly.post_attention_layernorm
            return cast(torch.cat([fold(ly.mlp.gate_proj, n2), fold(ly.mlp.up_proj, n2)]))

        def gate_up_bias(ly):
            return torch.cat([ly.mlp.gate_proj.bias, ly.mlp.up_proj.bias]) if ly.mlp.gate_proj.bias is not None else None

        if P == 1:
            ly = L[0]
            self.o = FusedLinear(ly.self_attn.o_proj.weight, ly.self_attn.o_proj.bias)
            self.gu = FusedLinear(gate_up(ly), gate_up_bias(ly))
            self.down = FusedLinear(ly.mlp.down_proj.weight, ly.mlp.down_proj.bias)
            return
        gamma = torch.stack([ly.cqil_gamma.to(f32) for ly in L])  # [P, d]
        self.gamma = cast(gamma)[:, None, :].contiguous()  # [P, 1, d]
        # Dense kernels: one bmm over the P layers beats P calls. Prepacked bf16: P calls.
        self.batched = not FusedLinear.packs(att[0].o_proj.weight)
        if self.batched:
            self.w_o = _batched([a.o_proj.weight for a in att])  # [P, H*hd, d]
            self.w_gu = _batched([gate_up(ly) for ly in L])  # [P, d, 2I]
            self.b_o = torch.stack([a.o_proj.bias for a in att])[:, None] if att[0].o_proj.bias is not None else None
            self.b_gu = torch.stack([gate_up_bias(ly) for ly in L])[:, None] if L[0].mlp.gate_proj.bias is not None \
                else None
        else:
            self.o = [FusedLinear(a.o_proj.weight, a.o_proj.bias) for a in att]
            self.gu = [FusedLinear(gate_up(ly), gate_up_bias(ly)) for ly in L]
        # sum_j gamma_j * m_j = concat_j(act_j) @ concat_j(gamma_j-scaled down_j): one matmul.
        down = [ly.mlp.down_proj.weight.to(f32) * g[:, None] for ly, g in zip(L, gamma, strict=True)]  # [d, I] each
        b_down = None
        if L[0].mlp.down_proj.bias is not None:
            b_down = cast(sum(ly.mlp.down_proj.bias.to(f32) * g for ly, g in zip(L, gamma, strict=True)))
        self.down = FusedLinear(cast(torch.cat(down, dim=1)), b_down)  # [d, P*I]
        self.mix = None
        if any(ly.cqil_beta is not None for ly in L):
            mix = torch.zeros(P, P, gamma.shape[-1], dtype=f32, device=gamma.device)
            for j, ly in enumerate(L):
                mix[j, j] = 1.0
                if ly.cqil_beta is not None:
                    n_beta = ly.cqil_beta.shape[0]
                    mix[j, j - n_beta: j] = ly.cqil_beta.to(f32)
            self.mix = cast(mix)[:, :, None, :].contiguous()  # [P, P, 1, d]

    def _act(self, gu: torch.Tensor) -> torch.Tensor:
        g, u = gu.chunk(2, dim=-1)
        return (F.silu(g) if self.silu else self.act(g)) * u

    def __call__(self, x, cos, sin, mask, is_causal, cache, step_idx) -> torch.Tensor:
        """x [B, T, d] -> y [B, T, d]; cos, sin from rope_tables(): [B|1, T, 1, hd]."""
        B, T, d = x.shape
        N, hd, P = B * T, self.hd, self.P
        x2 = x.reshape(N, d)
        # N1 of all P layers shares the statistics of x; the weights live in the qkv matrix.
        qkv = self.qkv(F.rms_norm(x2, (d,), eps=self.eps)).view(B, T, -1, hd)  # [B, T, P*(H+2G), hd]
        qk, v = qkv[:, :, : self.nqk], qkv[:, :, self.nqk:]  # [B, T, P*(H+G), hd], [B, T, P*G, hd]
        if self.qk_norm_w is not None:
            qk = F.rms_norm(qk, (hd,), eps=self.eps) * self.qk_norm_w
        # RoPE once over every q and k head of the group (sin is sign-folded, see rope_tables).
        qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)
        q, k = qk[:, :, : self.nq].transpose(1, 2), qk[:, :, self.nq:].transpose(1, 2)  # [B, heads, T, hd]
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, step_idx)  # [B, P*G, S, hd]
        # One attention call over P*H heads; the layer-major head order makes GQA map query
        # head j*H+i to kv head j*G+i//(H/G), i.e. to its own layer's keys.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.gqa)
        o = o.transpose(1, 2).reshape(N, P, -1)  # [N, P, H*hd]
        if P == 1:
            h = self.o(o[:, 0], add=x2)  # x + a
            act = self._act(self.gu(F.rms_norm(h, (d,), eps=self.eps)))  # [N, I]
            return self.down(act, add=h).view(B, T, d)
        if self.batched:
            a = torch.bmm(o.transpose(0, 1), self.w_o)  # [P, N, d]
            if self.b_o is not None:
                a = a + self.b_o
        else:
            a = torch.stack([self.o[j](o[:, j]) for j in range(P)])  # [P, N, d]
        z = a if self.mix is None else (self.mix * a[None]).sum(1)  # a_j + b_j, [P, N, d]
        un = F.rms_norm(x2 + z, (d,), eps=self.eps)  # each layer's N2 input, [P, N, d]
        if self.batched:
            gu = torch.bmm(un, self.w_gu)  # [P, N, 2I]
            if self.b_gu is not None:
                gu = gu + self.b_gu
            act = self._act(gu).transpose(0, 1).reshape(N, -1)  # [N, P*I], layer-major like down
        else:
            act = torch.cat([self._act(self.gu[j](un[j])) for j in range(P)], dim=-1)  # [N, P*I]
        base = x2 + (a * self.gamma).sum(0)  # x + sum_j gamma_j a_j, [N, d]
        return self.down(act, add=base).view(B, T, d)


# ----------------------------------------------------------------------------- models


class CqilPreTrainedModel(PreTrainedModel):
    config_class = CqilConfig
    config: CqilConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["CqilDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CqilDecoderLayer):
            if module.cqil_gamma is not None:
                hf_init.ones_(module.cqil_gamma)
            if module.cqil_beta is not None:
                hf_init.ones_(module.cqil_beta)


class CqilModel(CqilPreTrainedModel):
    def __init__(self, config: CqilConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        layers = []
        for step in config.groups:
            for pos, idx in enumerate(step):
                layers.append(CqilDecoderLayer(config, idx, pos, len(step)))
        self.layers = nn.ModuleList(layers)
        self.norm = CqilRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.engine = config.engine
        self._fused: list[FusedStep] | None = None
        self._fused_key: tuple | None = None
        self.post_init()

    # -- engine management

    def set_engine(self, engine: str) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got '{engine}'")
        self.engine = engine

    def _param_key(self) -> tuple:
        # Any in-place update (optimizer step, load_state_dict, copy_) bumps _version;
        # .to()/.half() replace the storage. Either way the fused weights are stale.
        return tuple((p.data_ptr(), p._version, p.dtype) for p in self.layers.parameters())

    def refresh_fused(self) -> None:
        """Drop the fused weights; they are rebuilt from the parameters on next use."""
        self._fused, self._fused_key = None, None

    @torch.no_grad()
    def fused_steps(self, check: bool = True) -> list[FusedStep]:
        """The fused weights of every step (built on first use, rebuilt if parameters changed)."""
        key = self._param_key() if (check or self._fused is None) else self._fused_key
        if self._fused is None or key != self._fused_key:
            self._fused = [FusedStep(self.step_layers(s), self.config) for s in range(self.config.num_steps)]
            self._fused_key = key
        return self._fused

    def step_layers(self, step_idx: int) -> list[CqilDecoderLayer]:
        step = self.config.groups[step_idx]
        return [self.layers[i] for i in step]

    def use_fused(self) -> bool:
        return self.engine == "fused" and not self.training and not torch.is_grad_enabled()

    def train(self, mode: bool = True):
        self.refresh_fused()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.refresh_fused()
        return super()._apply(fn, *args, **kwargs)

    # -- forward

    def run_steps(self, x, cos, sin, masks: dict, cache, fused: bool, hidden_states: list | None = None):
        """Run every step. masks maps layer type -> (mask, is_causal). x [B, T, d]."""
        steps = self.fused_steps() if fused else None
        if fused:
            cos, sin = rope_tables(cos, sin)
        types = self.config.layer_types
        for s, group in enumerate(self.config.groups):
            mask, is_causal = masks[types[group[0]]]
            if fused:
                x = steps[s](x, cos, sin, mask, is_causal, cache, s)
            else:
                x = reference_step(self.step_layers(s), x, cos, sin, mask, is_causal, cache, s)
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, d]
        B, T, _ = x.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()  # one entry per step, created lazily
        if past_key_values is not None:
            if any(getattr(layer, "is_sliding", False) for layer in getattr(past_key_values, "layers", [])):
                raise ValueError(
                    "cqil keeps one cache entry per step and masks sliding windows itself: pass a plain "
                    "DynamicCache() (not DynamicCache(config=...)), or let the model create one"
                )
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None]  # [1, T]
        cos, sin = self.rotary_emb(x, position_ids)  # [B|1, T, hd]
        masks = {}
        for kind in set(self.config.layer_types):
            window = self.config.sliding_window if kind == _SLIDING else None
            masks[kind] = build_attention_mask(attention_mask, B, T, past, window, x.device)
        hidden = [x] if output_hidden_states else None
        x = self.run_steps(x, cos, sin, masks, past_key_values, self.use_fused(), hidden)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x  # like transformers: the last entry is after the final norm
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
        )


class CqilForCausalLM(CqilPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CqilConfig):
        super().__init__(config)
        self.model = CqilModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def set_engine(self, engine: str) -> None:
        """Choose "fused" (default, inference) or "reference" (readable, differentiable)."""
        self.model.set_engine(engine)
        self.config.engine = engine

    def cqil_refresh_fused(self) -> None:
        """Forget the cached fused weights (they are rebuilt on next use)."""
        self.model.refresh_fused()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # transformers would build DynamicCache(config=...) with one (possibly sliding-window)
        # entry per *layer*; cqil keeps one full entry per *step* and masks windows itself.
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"cqil models support only the dynamic cache in generate() "
                    f"(got cache_implementation='{generation_config.cache_implementation}'); "
                    "use cqil's fastgen for a static cache"
                )
            model_kwargs["past_key_values"] = DynamicCache()
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )


__all__ = ["CqilConfig", "CqilModel", "CqilForCausalLM", "CqilPreTrainedModel", "check_groups"]
