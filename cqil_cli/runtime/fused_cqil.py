"""The fused engine: a group of P layers run as one wide layer, for inference on one device.

Self-contained (torch and transformers only; copied next to converted weights with
modeling_cqil.py, which imports it). It computes exactly what modeling_cqil.reference_step
defines, with the weights rearranged for speed: shared RMSNorm statistics with the N1 weights
folded into one q/k/v matrix, one attention call over P*heads, batched o_proj and gate/up, one
down projection with gamma folded in. Fused weights are derived from the layers' parameters
(see CqilModel.fused_steps, which rebuilds them when a parameter changes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


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

    def __init__(self, layers, config):
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

        def fold(lin: nn.Linear, norm: nn.Module) -> torch.Tensor:  # W diag(n): [out, in], fp32
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


__all__ = ["FusedLinear", "FusedStep", "rope_tables"]
