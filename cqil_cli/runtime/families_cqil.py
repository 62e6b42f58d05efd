"""The decoder layer of every family cqil runs, and what the families do differently.

Self-contained (torch, transformers, the standard library and configuration_cqil.py): every
converted checkpoint carries it next to modeling_cqil.py, which imports it (docs/runtime.md).

One layer ℓ of each family, with N1, N2 its input and MLP-input RMSNorms, A the attention and F
the gated MLP:

  llama, mistral, qwen2, qwen3   h = x + A(N1(x));          y = h + F(N2(h))
  phi3                           the same, with q/k/v fused into one qkv_proj and gate/up into
                                 one gate_up_proj (kept so in the checkpoint), partial RoPE
  gemma2, gemma3_text            h = x + Na(A(N1(x)));      y = h + Nf(F(N2(h)))
                                 four norms: N1 input_layernorm, Na post_attention_layernorm (on
                                 the attention *output*), N2 pre_feedforward_layernorm, Nf
                                 post_feedforward_layernorm; each scales by (1 + weight) in fp32.
                                 Embeddings times sqrt(hidden); scores scaled by
                                 query_pre_attn_scalar^-1/2; gemma2 soft-caps attention scores
                                 and logits (cap * tanh(s / cap)); gemma3 has per-head q/k norms
                                 and a local RoPE base for its sliding-window layers.
  granite                        h = x + r·A(N1(x));        y = h + r·F(N2(h))
                                 r the residual multiplier; embeddings times a multiplier,
                                 attention scores scaled by attention_multiplier, logits divided
                                 by logits_scaling (edges_cqil.py)
  olmo2                          h = x + Na(A(x));          y = h + Nf(F(h))
                                 no input norms; q/k RMSNorms over the whole projection (all
                                 heads together, before RoPE); its norms multiply the gain in fp32

In a group each member's two deltas are computed as in its own layer, from the group's input:
  a_j = Na_j(A_j(N1_j(x))),   m_j = Nf_j(F_j(N2_j(x + a_j + b_j))),   y = x + Σ_j γ_j (a_j + m_j)
with Na = Nf = identity for the families without post-norms, N1 = N2 = identity for OLMo 2,
and both deltas times r for Granite (`attn_input`, `attn_output`, `mlp_input`, `mlp_delta`).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .configuration_cqil import FULL, SLIDING

# ----------------------------------------------------------------------------- norms


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, in fp32 (every family's norm statistics)."""
    x = x.to(torch.float32)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class CqilRMSNorm(nn.Module):
    """RMSNorm exactly as transformers' Llama computes it (statistics in fp32, the weight applied
    after the cast back). The other families' norms differ in forward and gain only."""

    unit_offset = False

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size) if self.unit_offset
                                   else torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * _normalized(x, self.variance_epsilon).to(x.dtype)

    def gain(self) -> torch.Tensor:
        """The per-channel factor after normalisation: the weight."""
        return self.weight


class CqilOffsetRMSNorm(CqilRMSNorm):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), all in fp32, then cast (as transformers)."""

    unit_offset = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_normalized(x, self.variance_epsilon) * (1.0 + self.weight.float())).type_as(x)

    def gain(self) -> torch.Tensor:
        """The per-channel factor after normalisation: 1 + weight."""
        return 1.0 + self.weight


class CqilFp32GainRMSNorm(CqilRMSNorm):
    """OLMo 2's RMSNorm: x / rms(x) times the weight, both in fp32, then cast (as transformers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * _normalized(x, self.variance_epsilon)).to(x.dtype)


def make_norm(config, dim: int) -> nn.Module:
    """The RMSNorm of the config's family over `dim` channels."""
    if getattr(config, "norm_unit_offset", False):
        return CqilOffsetRMSNorm(dim, eps=config.rms_norm_eps)
    if getattr(config, "norm_fp32_gain", False):
        return CqilFp32GainRMSNorm(dim, eps=config.rms_norm_eps)
    return CqilRMSNorm(dim, eps=config.rms_norm_eps)


def norm_in_fp32(config) -> bool:
    """Whether the family's norms compute in fp32 up to the cast (Gemma, OLMo 2), so a fast path
    applies their gains in fp32 too."""
    return bool(getattr(config, "norm_unit_offset", False) or getattr(config, "norm_fp32_gain", False))


def whole_projection_norm(norm: nn.Module, t: torch.Tensor, width: int, sum_reduce) -> torch.Tensor:
    """An fp32-gain RMSNorm (OLMo 2's q/k norm) of t [..., w], a rank's w of the projection's
    `width` channels: the mean square over all `width`, its sum completed by sum_reduce (the
    lane's all-reduce) — norm(t) itself when the rank holds every channel."""
    if sum_reduce is None or t.shape[-1] == width:
        return norm(t)
    x = t.to(torch.float32)
    square_sum = sum_reduce(x.pow(2).sum(-1, keepdim=True))  # [..., 1], over every channel
    x = x * torch.rsqrt(square_sum / width + norm.variance_epsilon)
    return (norm.weight * x).to(t.dtype)


# ----------------------------------------------------------------------------- RoPE


class CqilRotaryEmbedding(LlamaRotaryEmbedding):
    """Llama's RoPE whose default type honours partial_rotary_factor (Phi-3): cos/sin cover the
    first int(head_dim * factor) channels only; the other RoPE types already honour it."""

    @staticmethod
    def compute_default_rope_parameters(config, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * factor)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq.to(device) if device is not None else inv_freq, 1.0


def _per_type_rope(config) -> dict | None:
    """rope_parameters by layer type (Gemma 3), or None when one dict serves every layer.
    (Some transformers releases also set a top-level rope_theta beside the per-type dicts.)"""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and any(isinstance(params.get(k), dict) for k in (FULL, SLIDING)):
        return params
    return None


def has_local_rope(config) -> bool:
    """Whether sliding-window layers have their own RoPE (Gemma 3's local base)."""
    per_type = _per_type_rope(config)
    return per_type is not None and per_type.get(SLIDING) is not None and SLIDING in config.layer_types


def make_rotary(config, kind: str = FULL) -> nn.Module:
    """The RoPE module of layers of type `kind` (FULL: every layer but Gemma 3's sliding ones).

    Called as rotary(x, position_ids) -> cos, sin [B|1, T, rotary_dim]."""
    per_type = _per_type_rope(config)
    if per_type is not None:  # a copy of the config whose rope_parameters is this type's dict
        params = dict(per_type.get(kind) or per_type.get(FULL) or per_type.get(SLIDING))
        params.setdefault("rope_type", "default")
        config = copy.copy(config)
        config.rope_parameters = params
    if config.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        return CqilRotaryEmbedding(config=config)
    return LlamaRotaryEmbedding(config=config)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, h, T, hd], cos/sin [B|1, 1, T, r]: RoPE on the first r channels (all when r = hd)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot = x[..., :r]
    return torch.cat([rot * cos + rotate_half(rot) * sin, x[..., r:]], dim=-1)


# ----------------------------------------------------------------------------- attention


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2's soft-capping), x itself when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


@functools.lru_cache(maxsize=None)
def embedding_multiplier(hidden_size: int, dtype: torch.dtype) -> float:
    """sqrt(hidden_size) rounded to `dtype` as transformers' Gemma embedding does (55.4256 is
    55.5 in bfloat16), as a Python float: x * it equals x * that tensor exactly."""
    return float(torch.tensor(hidden_size ** 0.5).to(dtype))


def attention(q, k, v, mask, is_causal: bool, scale: float | None = None, cap: float | None = None,
              dropout: float = 0.0) -> torch.Tensor:
    """q [B, H, T, hd], k/v [B, G, S, hd] -> [B, H, T, hd]; query head i reads kv head i // (H/G).

    mask: bool [B|1, 1, T, S] (True = may attend), additive (0 / -inf), or None with is_causal.
    scale: of the scores (None: hd^-1/2). cap: attention logit soft-cap (Gemma 2), computed in
    the eager form transformers uses for it (SDPA cannot cap); otherwise SDPA.
    """
    gqa = q.shape[1] != k.shape[1]
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=is_causal, scale=scale, enable_gqa=gqa)
    # The r = H/G query heads of kv head g are consecutive: fold them into the query axis
    # ([B, G, r*T, hd]) instead of repeating k and v r times (the cache is the large operand).
    B, H, T, hd = q.shape
    G, S = k.shape[1], k.shape[-2]
    r = H // G
    scores = torch.matmul(q.reshape(B, G, r * T, hd), k.transpose(2, 3))  # [B, G, r*T, S]
    scores = softcap(scores * (scale if scale is not None else hd ** -0.5), cap).view(B, G, r, T, S)
    if mask is None and is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        mask = mask.unsqueeze(-3) if mask.dim() == 4 else mask  # [B|1, 1, 1, T, S]: every head
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:  # additive (0 / -inf), as fastgen's decode rows
            scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs.view(B, G, r * T, S), v).view(B, H, T, hd)


def qkv_row_slices(heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[int, int]]:
    """Rows [start, stop) of q, k and v in a fused qkv_proj weight (Phi-3's layout: the q rows
    of every head, then k, then v; head i's q rows are start + i*head_dim ...)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}


class CqilAttention(nn.Module):
    """Attention of one layer; module names match the base checkpoint."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.dropout = float(config.attention_dropout)
        d, hd = config.hidden_size, config.head_dim
        self.fused = bool(getattr(config, "fused_projections", False))
        if self.fused:  # Phi-3: rows q of every head, then k, then v (qkv_row_slices)
            rows = (self.num_heads + 2 * self.num_kv_heads) * hd
            self.qkv_proj = nn.Linear(d, rows, bias=config.attention_bias)
        else:
            self.q_proj = nn.Linear(d, self.num_heads * hd, bias=config.attention_bias)
            self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
            self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=config.attention_out_bias)
        # q/k RMSNorms: per head (qwen3, gemma3: [hd]) or over the whole projection (OLMo 2:
        # [H*hd] and [G*hd], before the heads are split)
        self.qk_norm_whole = bool(getattr(config, "qk_norm_whole", False))
        if config.qk_norm:
            whole = self.qk_norm_whole
            self.q_norm = make_norm(config, self.num_heads * hd if whole else hd)
            self.k_norm = make_norm(config, self.num_kv_heads * hd if whole else hd)
        else:
            self.q_norm = self.k_norm = None
        scalar = getattr(config, "query_pre_attn_scalar", None)
        multiplier = getattr(config, "attention_multiplier", None)  # Granite
        # scores times this; None: SDPA's hd^-1/2
        self.scale = multiplier if multiplier is not None else scalar ** -0.5 if scalar else None
        self.cap = getattr(config, "attn_logit_softcapping", None)

    def qkv_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """[(weight, bias)] of q, k, v: each [rows, d] (views of qkv_proj for Phi-3)."""
        if not self.fused:
            return [(p.weight, p.bias) for p in (self.q_proj, self.k_proj, self.v_proj)]
        w, b = self.qkv_proj.weight, self.qkv_proj.bias
        spans = qkv_row_slices(self.num_heads, self.num_kv_heads, self.head_dim).values()
        return [(w[a:z], b[a:z] if b is not None else None) for a, z in spans]

    def project(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                whole_norm: tuple | None = None):
        """h [B, T, d] (already normed) -> q [B, H, T, hd], k and v [B, G, T, hd] (RoPE applied).

        whole_norm: (sum_reduce, q width, k width) on a rank holding part of the heads of a
        family whose q/k norms span the whole projection (whole_projection_norm)."""
        B, T, _ = h.shape
        if self.fused:
            q, k, v = self.qkv_proj(h).split(
                [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                 self.num_kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)  # [B, T, H*hd | G*hd]
        if self.q_norm is not None and self.qk_norm_whole:  # OLMo 2: before splitting heads
            reduce, q_width, k_width = whole_norm or (None, q.shape[-1], k.shape[-1])
            q = whole_projection_norm(self.q_norm, q, q_width, reduce)
            k = whole_projection_norm(self.k_norm, k, k_width, reduce)
        q, k = q.reshape(B, T, -1, self.head_dim), k.reshape(B, T, -1, self.head_dim)
        v = v.reshape(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and not self.qk_norm_whole:  # qwen3, gemma3: each head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B|1, 1, T, r]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        """q [B, H, T, hd], k/v [B, G, S, hd] -> attention output after o_proj [B, T, d]."""
        B, _, T, _ = q.shape
        o = attention(q, k, v, mask, is_causal, self.scale, self.cap,
                      self.dropout if self.training else 0.0)  # [B, H, T, hd]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


# ----------------------------------------------------------------------------- MLP and layer


class CqilMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.fused = bool(getattr(config, "fused_projections", False))
        if self.fused:  # Phi-3: rows gate, then up
            self.gate_up_proj = nn.Linear(d, 2 * i, bias=config.mlp_bias)
        else:
            self.gate_proj = nn.Linear(d, i, bias=config.mlp_bias)
            self.up_proj = nn.Linear(d, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, d, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(up * self.act_fn(gate))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def gate_up_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """[(weight, bias)] of gate and up: each [I, d] (views of gate_up_proj for Phi-3)."""
        if not self.fused:
            return [(p.weight, p.bias) for p in (self.gate_proj, self.up_proj)]
        w, b = self.gate_up_proj.weight, self.gate_up_proj.bias
        i = w.shape[0] // 2
        return [(w[:i], b[:i] if b is not None else None), (w[i:], b[i:] if b is not None else None)]


class CqilDecoderLayer(nn.Module):
    """One base layer plus, when it sits in a group, its gamma and beta vectors."""

    def __init__(self, config, layer_idx: int, group_pos: int, group_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = CqilAttention(config)
        self.mlp = CqilMLP(config)
        d = config.hidden_size
        self.input_norms = bool(getattr(config, "input_norms", True))  # False: OLMo 2
        self.post_norms = bool(getattr(config, "post_norms", False))
        self.residual_multiplier = getattr(config, "residual_multiplier", None)  # Granite
        if self.input_norms:
            self.input_layernorm = make_norm(config, d)
        # Llama: N2 (the MLP input); with post-norms (Gemma, OLMo 2): Na, on the attention output
        self.post_attention_layernorm = make_norm(config, d)
        if self.post_norms:
            if self.input_norms:  # Gemma
                self.pre_feedforward_layernorm = make_norm(config, d)
            self.post_feedforward_layernorm = make_norm(config, d)
        n_beta = min(group_pos, config.bypass_distance) if group_size > 1 else 0
        # gamma_j scales this layer's contribution; beta rows weight the n_beta previous a_k.
        self.cqil_gamma = nn.Parameter(torch.ones(d)) if group_size > 1 else None
        self.cqil_beta = nn.Parameter(torch.ones(n_beta, d)) if n_beta > 0 else None

    @property
    def attn_norm(self) -> nn.Module | None:
        """N1, the norm of the attention input (None: OLMo 2 has none)."""
        return self.input_layernorm if self.input_norms else None

    @property
    def mlp_norm(self) -> nn.Module | None:
        """N2, the norm of the MLP input (Llama's post_attention_layernorm, Gemma's pre-FF;
        None: OLMo 2 has none)."""
        if not self.post_norms:
            return self.post_attention_layernorm
        return self.pre_feedforward_layernorm if self.input_norms else None

    @property
    def attn_output_norm(self) -> nn.Module | None:
        """Na, the norm of the attention output (Gemma, OLMo 2), else None."""
        return self.post_attention_layernorm if self.post_norms else None

    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        """N1(x), what the attention projections read."""
        return self.input_layernorm(x) if self.input_norms else x

    def mlp_input(self, h: torch.Tensor) -> torch.Tensor:
        """N2(h), what the MLP reads."""
        norm = self.mlp_norm
        return norm(h) if norm is not None else h

    def attn_output(self, o: torch.Tensor) -> torch.Tensor:
        """a_j from the attention output after o_proj [B, T, d] (or a rank's partial sum of it
        where the family has no post-norm): Na(o) with post-norms, r·o for Granite, else o."""
        if self.post_norms:
            o = self.post_attention_layernorm(o)
        return o if self.residual_multiplier is None else o * self.residual_multiplier

    def mlp_delta(self, h: torch.Tensor) -> torch.Tensor:
        """m_j of the MLP input h [B, T, d] (before N2): Nf(F(N2(h))), Nf = identity without
        post-norms, times r for Granite."""
        return self.mlp_output(self.mlp(self.mlp_input(h)))

    def mlp_output(self, f: torch.Tensor) -> torch.Tensor:
        """m_j from the MLP's output f [B, T, d]: Nf(f) with post-norms, r·f for Granite."""
        if self.post_norms:
            f = self.post_feedforward_layernorm(f)
        return f if self.residual_multiplier is None else f * self.residual_multiplier


__all__ = ["CqilRMSNorm", "CqilOffsetRMSNorm", "CqilFp32GainRMSNorm", "make_norm", "norm_in_fp32",
           "whole_projection_norm", "CqilRotaryEmbedding", "make_rotary",
           "has_local_rope", "apply_rope", "rotate_half", "softcap", "embedding_multiplier",
           "attention", "qkv_row_slices", "CqilAttention", "CqilMLP", "CqilDecoderLayer"]
