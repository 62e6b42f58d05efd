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
    projected = [l.self_attn.project(l.input_layernorm(x), cos, sin) for l in layers]
    qs = [p[0] for p in projected]
    ks = [p[1] for p in projected]
    vs = [p[2] for p in projected]
    if cache is not None:
        # One cache entry per step: the P layers' heads, layer-major.
        k_all, v_all = cache.update(torch.cat(ks, dim=1), torch.cat(vs, dim=1), step_idx)
        ks, vs = k_all.chunk(P, dim=1), v_all.chunk(P, dim=1)
    a = [l.self_attn.attend(q, k, v, mask, is_causal) for l, q, k, v in zip(layers, qs, ks, vs)]
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


class FusedStep:
    """Inference weights of one step, derived from its layers' parameters.

    P layers, H heads, G kv heads, hd head dim, d hidden, I intermediate.
      w_qkv  [P*(H+2G)*hd, d]  rows: q of l_0..l_{P-1}, then k of all, then v of all;
                               N1_j weight folded into layer j's columns (x is normed once)
      b_qkv  [P*(H+2G)*hd] or None
      qk_norm_w [P*(H+G), hd] or None   per-head q/k norm weights (qwen3), same head order
      single layer (P == 1):  w_o [d, H*hd], w_gu [2I, d] (N2 folded), w_down [d, I]
      group (P > 1):          w_o [P, H*hd, d], w_gu [P, d, 2I] (N2 folded),
                              w_down [P*I, d] with gamma_j folded into layer j's rows,
                              gamma [P, 1, d], mix [P, P, 1, d] (a_j + b_j = sum_k mix[j,k] a_k)
    """

    def __init__(self, layers, config: CqilConfig):
        L = layers
        self.P = P = len(L)
        self.H, self.G, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.I = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.silu = config.hidden_act in ("silu", "swish")
        self.act = ACT2FN[config.hidden_act]
        self.split = [P * self.H, P * self.G, P * self.G]
        self.gqa = self.H != self.G
        dtype = L[0].self_attn.q_proj.weight.dtype
        f32 = torch.float32

        def fold(lin: nn.Linear, norm: CqilRMSNorm) -> torch.Tensor:  # W diag(n): [out, in]
            return lin.weight.to(f32) * norm.weight.to(f32)[None, :]

        att = [l.self_attn for l in L]
        w = [fold(a.q_proj, l.input_layernorm) for a, l in zip(att, L)]
        w += [fold(a.k_proj, l.input_layernorm) for a, l in zip(att, L)]
        w += [fold(a.v_proj, l.input_layernorm) for a, l in zip(att, L)]
        self.w_qkv = torch.cat(w).to(dtype).contiguous()
        self.b_qkv = None
        if att[0].q_proj.bias is not None:
            b = [a.q_proj.bias for a in att] + [a.k_proj.bias for a in att] + [a.v_proj.bias for a in att]
            self.b_qkv = torch.cat(b).contiguous()
        self.qk_norm_w = None
        if att[0].q_norm is not None:
            qn = [a.q_norm.weight[None].expand(self.H, -1) for a in att]
            kn = [a.k_norm.weight[None].expand(self.G, -1) for a in att]
            self.qk_norm_w = torch.cat(qn + kn).contiguous()  # [P*(H+G), hd]

        def gate_up(l) -> torch.Tensor:  # [2I, d], N2 folded
            n2 = l.post_attention_layernorm
            return torch.cat([fold(l.mlp.gate_proj, n2), fold(l.mlp.up_proj, n2)])

        mlp_bias = L[0].mlp.gate_proj.bias is not None
        o_bias = att[0].o_proj.bias is not None
        if P == 1:
            l = L[0]
            self.w_o = l.self_attn.o_proj.weight
            self.b_o = l.self_attn.o_proj.bias
            self.w_gu = gate_up(l).to(dtype).contiguous()
            self.b_gu = torch.cat([l.mlp.gate_proj.bias, l.mlp.up_proj.bias]) if mlp_bias else None
            self.w_down = l.mlp.down_proj.weight
            self.b_down = l.mlp.down_proj.bias
            return
        gamma = torch.stack([l.cqil_gamma.to(f32) for l in L])  # [P, d]
        self.gamma = gamma.to(dtype)[:, None, :].contiguous()  # [P, 1, d]
        self.w_o = torch.stack([a.o_proj.weight.t() for a in att]).contiguous()  # [P, H*hd, d]
        self.b_o = torch.stack([a.o_proj.bias for a in att])[:, None, :] if o_bias else None  # [P, 1, d]
        self.w_gu = torch.stack([gate_up(l).t() for l in L]).to(dtype).contiguous()  # [P, d, 2I]
        self.b_gu = None
        if mlp_bias:
            self.b_gu = torch.stack([torch.cat([l.mlp.gate_proj.bias, l.mlp.up_proj.bias]) for l in L])[:, None, :]
        # sum_j gamma_j * m_j = concat_j(act_j) @ concat_j(gamma_j-scaled down_j^T): one matmul.
        self.w_down = torch.cat(
            [(l.mlp.down_proj.weight.to(f32) * g[:, None]).t() for l, g in zip(L, gamma)]
        ).to(dtype).contiguous()  # [P*I, d]
        self.b_down = None
        if mlp_bias:
            self.b_down = sum(l.mlp.down_proj.bias.to(f32) * g for l, g in zip(L, gamma)).to(dtype)
        self.mix = None
        if any(l.cqil_beta is not None for l in L):
            mix = torch.zeros(P, P, gamma.shape[-1], dtype=f32, device=gamma.device)
            for j, l in enumerate(L):
                mix[j, j] = 1.0
                if l.cqil_beta is not None:
                    n_beta = l.cqil_beta.shape[0]
                    mix[j, j - n_beta: j] = l.cqil_beta.to(f32)
            self.mix = mix.to(dtype)[:, :, None, :].contiguous()  # [P, P, 1, d]

    def __call__(self, x, cos, sin, mask, is_causal, cache, step_idx) -> torch.Tensor:
        """x [B, T, d] -> y [B, T, d]; cos/sin [B|1, T, hd]."""
        B, T, d = x.shape
        hd, P = self.hd, self.P
        # N1 of all P layers shares the statistics of x; the weights live in w_qkv.
        xn = F.rms_norm(x, (d,), eps=self.eps)
        qkv = F.linear(xn, self.w_qkv, self.b_qkv).view(B, T, -1, hd)  # [B, T, P*(H+2G), hd]
        nq = self.split[0] + self.split[1]
        qk, v = qkv[:, :, :nq], qkv[:, :, nq:]  # [B, T, P*(H+G), hd], [B, T, P*G, hd]
        if self.qk_norm_w is not None:
            qk = F.rms_norm(qk, (hd,), eps=self.eps) * self.qk_norm_w
        # RoPE once over every q and k head of the group.
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B|1, T, 1, hd]
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk.split(self.split[:2], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if cache is not None:
            k, v = cache.update(k, v, step_idx)  # [B, P*G, S, hd]
        # One attention call over P*H heads; layer-major head order makes GQA map
        # query head j*H+i to kv head j*G+i//(H/G), i.e. to its own layer.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.gqa)
        o = o.transpose(1, 2)  # [B, T, P*H, hd]
        N = B * T
        if P == 1:
            h = x + F.linear(o.reshape(B, T, -1), self.w_o, self.b_o)  # x + a
            hn = F.rms_norm(h, (d,), eps=self.eps)
            gu = F.linear(hn, self.w_gu, self.b_gu)  # [B, T, 2I]
            g, u = gu.chunk(2, dim=-1)
            act = F.silu(g) if self.silu else self.act(g)
            if self.b_down is not None:
                return h + F.linear(act * u, self.w_down, self.b_down)
            return torch.addmm(h.view(N, d), (act * u).view(N, -1), self.w_down.t()).view(B, T, d)
        o = o.reshape(N, P, -1).transpose(0, 1)  # [P, N, H*hd]
        a = torch.bmm(o, self.w_o)  # [P, N, d]
        if self.b_o is not None:
            a = a + self.b_o
        x2 = x.view(1, N, d)
        z = a if self.mix is None else (self.mix * a[None]).sum(1)  # a_j + b_j, [P, N, d]
        un = F.rms_norm(x2 + z, (d,), eps=self.eps)  # each layer's N2 input, [P, N, d]
        gu = torch.bmm(un, self.w_gu)  # [P, N, 2I]
        if self.b_gu is not None:
            gu = gu + self.b_gu
        g, u = gu.chunk(2, dim=-1)
        act = (F.silu(g) if self.silu else self.act(g)) * u  # [P, N, I]
        act = act.transpose(0, 1).reshape(N, -1)  # [N, P*I], layer-major like w_down
        base = x2[0] + (a * self.gamma).sum(0)  # x + sum_j gamma_j a_j, [N, d]
        if self.b_down is not None:
            base = base + self.b_down
        return torch.addmm(base, act, self.w_down).view(B, T, d)


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
