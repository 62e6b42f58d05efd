"""The fused engine: a group of P layers run as one wide layer, for inference on one device.

Self-contained (torch, transformers and its sibling families_cqil.py; copied next to converted
weights with modeling_cqil.py, which imports it). It computes exactly what modeling_cqil.reference_step
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

from .families_cqil import attention


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
             all; N1_j gain folded into layer j's columns (x is normed once for the group)
      qk_norm_w [P*(H+G), hd]  per-head q/k norm gains (qwen3, gemma3), same head order
      single layer (P == 1): o [d, H*hd], gu [2I, d] (N2 folded), down [d, I]
      group (P > 1): o_j [d, H*hd] and gu_j [2I, d] (N2_j folded) per layer, either batched
             for bmm (w_o [P, H*hd, d], w_gu [P, d, 2I]) or as P FusedLinears (prepacked bf16);
             down [d, P*I] with gamma_j folded into layer j's columns, gamma [P, 1, d],
             mix [P, P, 1, d] (a_j + b_j = sum_k mix[j, k] * a_k)
      post-norms (Gemma): post_attn [P, 1, d] the Na_j gains; post_ff [P, 1, d] the Nf_j gains
             (times gamma_j in a group), fp32 like qk_norm_w there (these norms run in fp32);
             a group's down projections then run per member (w_down [P, I, d] or P
             FusedLinears), since Nf_j acts on each m_j alone
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
        att = [ly.self_attn for ly in L]
        self.scale, self.cap = att[0].scale, att[0].cap
        self.post_norms = bool(getattr(config, "post_norms", False))
        dtype = att[0].o_proj.weight.dtype
        f32 = torch.float32

        def fold(w: torch.Tensor, norm: nn.Module) -> torch.Tensor:  # W diag(gain): [out, in], fp32
            return w.to(f32) * norm.gain().to(f32)[None, :]

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype)

        def stacked_gains(norms, scales=None) -> torch.Tensor:  # [P, 1, d], fp32 (see _norm)
            g = torch.stack([n.gain().to(f32) for n in norms])
            return (g if scales is None else g * scales)[:, None, :].contiguous()

        qkv = [a.qkv_weights() for a in att]  # per layer [(w, b)] of q, k, v
        w = [fold(parts[i][0], ly.input_layernorm) for i in range(3) for parts, ly in zip(qkv, L, strict=True)]
        b = None
        if qkv[0][0][1] is not None:
            b = torch.cat([parts[i][1] for i in range(3) for parts in qkv])
        self.qkv = FusedLinear(cast(torch.cat(w)), b)
        self.qk_norm_w = None
        if att[0].q_norm is not None:
            qn = [a.q_norm.gain()[None].expand(self.H, -1) for a in att]
            kn = [a.k_norm.gain()[None].expand(self.G, -1) for a in att]
            qk_w = torch.cat(qn + kn).contiguous()  # [P*(H+G), hd]
            self.qk_norm_w = qk_w.to(f32) if self.post_norms else cast(qk_w)

        def gate_up(ly) -> torch.Tensor:  # [2I, d], N2 folded
            (wg, _), (wu, _) = ly.mlp.gate_up_weights()
            return cast(torch.cat([fold(wg, ly.mlp_norm), fold(wu, ly.mlp_norm)]))

        def gate_up_bias(ly):
            (_, bg), (_, bu) = ly.mlp.gate_up_weights()
            return torch.cat([bg, bu]) if bg is not None else None

        if self.post_norms:
            self.post_attn = stacked_gains([ly.attn_output_norm for ly in L])
        if P == 1:
            ly = L[0]
            self.o = FusedLinear(ly.self_attn.o_proj.weight, ly.self_attn.o_proj.bias)
            self.gu = FusedLinear(gate_up(ly), gate_up_bias(ly))
            self.down = FusedLinear(ly.mlp.down_proj.weight, ly.mlp.down_proj.bias)
            if self.post_norms:
                self.post_attn, self.post_ff = self.post_attn[0, 0], stacked_gains([ly.post_feedforward_layernorm])[0, 0]
            return
        gamma = torch.stack([ly.cqil_gamma.to(f32) for ly in L])  # [P, d]
        self.gamma = cast(gamma)[:, None, :].contiguous()  # [P, 1, d]
        # Dense kernels: one bmm over the P layers beats P calls. Prepacked bf16: P calls.
        self.batched = not FusedLinear.packs(att[0].o_proj.weight)
        if self.batched:
            self.w_o = _batched([a.o_proj.weight for a in att])  # [P, H*hd, d]
            self.w_gu = _batched([gate_up(ly) for ly in L])  # [P, d, 2I]
            self.b_o = torch.stack([a.o_proj.bias for a in att])[:, None] if att[0].o_proj.bias is not None else None
            self.b_gu = torch.stack([gate_up_bias(ly) for ly in L])[:, None] if gate_up_bias(L[0]) is not None \
                else None
        else:
            self.o = [FusedLinear(a.o_proj.weight, a.o_proj.bias) for a in att]
            self.gu = [FusedLinear(gate_up(ly), gate_up_bias(ly)) for ly in L]
        if self.post_norms:  # each m_j normed alone: P down projections, gamma_j in Nf_j's gain
            self.post_ff = stacked_gains([ly.post_feedforward_layernorm for ly in L], gamma)
            if self.batched:
                self.w_down = _batched([ly.mlp.down_proj.weight for ly in L])  # [P, I, d]
                self.b_down = torch.stack([ly.mlp.down_proj.bias for ly in L])[:, None] \
                    if L[0].mlp.down_proj.bias is not None else None
            else:
                self.down = [FusedLinear(ly.mlp.down_proj.weight, ly.mlp.down_proj.bias) for ly in L]
        else:
            # sum_j gamma_j * m_j = concat_j(act_j) @ concat_j(gamma_j-scaled down_j): one matmul.
            down = [ly.mlp.down_proj.weight.to(f32) * g[:, None] for ly, g in zip(L, gamma, strict=True)]  # [d, I]
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

    def _norm(self, t: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """RMSNorm of t [..., d] over its last dimension, times gain (fp32, [d] or [P, 1, d]),
        computed in fp32 and rounded once, as Gemma's norms are."""
        return (F.rms_norm(t.float(), (t.shape[-1],), eps=self.eps) * gain).to(t.dtype)

    def _rope(self, qk: torch.Tensor, cos, sin) -> torch.Tensor:
        """RoPE of qk [B, T, heads, hd] on the first r channels of cos/sin [B|1, T, 1|heads, r]
        (sin sign-folded, see rope_tables): 3 ops, q*cos + roll(q)*sin."""
        r = cos.shape[-1]
        if r == self.hd:
            return torch.addcmul(qk * cos, qk.roll(r // 2, -1), sin)
        rot = qk[..., :r]  # partial rotary (Phi-3): the other channels pass unchanged
        return torch.cat([torch.addcmul(rot * cos, rot.roll(r // 2, -1), sin), qk[..., r:]], dim=-1)

    def _per_head(self, tables: list[torch.Tensor]) -> torch.Tensor:
        """Per-member RoPE tables [B|1, T, 1, r] -> one per q and k head [B|1, T, P*(H+G), r]."""
        if all(t is tables[0] for t in tables):
            return tables[0]
        return torch.cat([t.expand(-1, -1, n, -1) for n in (self.H, self.G) for t in tables], dim=2)

    def _attend(self, q, k, v, mask, is_causal) -> torch.Tensor:
        """q [B, P*H, T, hd], k/v [B, P*G, S, hd] -> [B, P*H, T, hd]. The layer-major head order
        makes GQA map query head j*H+i to kv head j*G+i//(H/G), i.e. to its own layer's keys.
        Per-member masks (a group mixing attention types): one call per run of equal masks."""
        if not isinstance(mask, list):
            return attention(q, k, v, mask, is_causal, self.scale, self.cap)
        H, G, out, j = self.H, self.G, [], 0
        while j < self.P:
            e = j + 1
            while e < self.P and mask[e] is mask[j] and is_causal[e] == is_causal[j]:
                e += 1
            out.append(attention(q[:, j * H:e * H], k[:, j * G:e * G], v[:, j * G:e * G],
                                 mask[j], is_causal[j], self.scale, self.cap))
            j = e
        return torch.cat(out, dim=1)

    def __call__(self, x, cos, sin, mask, is_causal, cache, step_idx) -> torch.Tensor:
        """x [B, T, d] -> y [B, T, d]; cos, sin from rope_tables(): [B|1, T, 1, r], or lists of
        them and of mask / is_causal with one entry per member (modeling_cqil.step_inputs)."""
        B, T, d = x.shape
        N, hd, P = B * T, self.hd, self.P
        x2 = x.reshape(N, d)
        # N1 of all P layers shares the statistics of x; the weights live in the qkv matrix.
        qkv = self.qkv(F.rms_norm(x2, (d,), eps=self.eps)).view(B, T, -1, hd)  # [B, T, P*(H+2G), hd]
        qk, v = qkv[:, :, : self.nqk], qkv[:, :, self.nqk:]  # [B, T, P*(H+G), hd], [B, T, P*G, hd]
        if self.qk_norm_w is not None and self.post_norms:  # gemma3: in fp32, as its norms
            qk = self._norm(qk, self.qk_norm_w)
        elif self.qk_norm_w is not None:
            qk = F.rms_norm(qk, (hd,), eps=self.eps) * self.qk_norm_w
        if isinstance(cos, list):  # members with their own RoPE (Gemma 3's local base)
            cos, sin = self._per_head(cos), self._per_head(sin)
        # RoPE once over every q and k head of the group (sin is sign-folded, see rope_tables).
        qk = self._rope(qk, cos, sin)
        q, k = qk[:, :, : self.nq].transpose(1, 2), qk[:, :, self.nq:].transpose(1, 2)  # [B, heads, T, hd]
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, step_idx)  # [B, P*G, S, hd]
        o = self._attend(q, k, v, mask, is_causal)  # [B, P*H, T, hd]
        o = o.transpose(1, 2).reshape(N, P, -1)  # [N, P, H*hd]
        if P == 1:
            if self.post_norms:  # h = x + Na(o W_o); y = h + Nf(down(act))
                h = x2 + self._norm(self.o(o[:, 0]), self.post_attn)
                act = self._act(self.gu(F.rms_norm(h, (d,), eps=self.eps)))
                return (h + self._norm(self.down(act), self.post_ff)).view(B, T, d)
            h = self.o(o[:, 0], add=x2)  # x + a
            act = self._act(self.gu(F.rms_norm(h, (d,), eps=self.eps)))  # [N, I]
            return self.down(act, add=h).view(B, T, d)
        if self.batched:
            a = torch.bmm(o.transpose(0, 1), self.w_o)  # [P, N, d]
            if self.b_o is not None:
                a = a + self.b_o
        else:
            a = torch.stack([self.o[j](o[:, j]) for j in range(P)])  # [P, N, d]
        if self.post_norms:
            a = self._norm(a, self.post_attn)  # a_j = Na_j(...)
        z = a if self.mix is None else (self.mix * a[None]).sum(1)  # a_j + b_j, [P, N, d]
        un = F.rms_norm(x2 + z, (d,), eps=self.eps)  # each layer's N2 input, [P, N, d]
        if self.batched:
            gu = torch.bmm(un, self.w_gu)  # [P, N, 2I]
            if self.b_gu is not None:
                gu = gu + self.b_gu
            act = self._act(gu)  # [P, N, I]
        else:
            act = torch.stack([self._act(self.gu[j](un[j])) for j in range(P)])  # [P, N, I]
        base = x2 + (a * self.gamma).sum(0)  # x + sum_j gamma_j a_j, [N, d]
        if self.post_norms:  # sum_j gamma_j Nf_j(m_j), gamma_j folded into the Nf_j gain
            if self.batched:
                m = torch.bmm(act, self.w_down)  # [P, N, d]
                if self.b_down is not None:
                    m = m + self.b_down
            else:
                m = torch.stack([self.down[j](act[j]) for j in range(P)])
            return (base + self._norm(m, self.post_ff).sum(0)).view(B, T, d)
        act = act.transpose(0, 1).reshape(N, -1)  # [N, P*I], layer-major like down
        return self.down(act, add=base).view(B, T, d)


__all__ = ["FusedLinear", "FusedStep", "rope_tables"]
