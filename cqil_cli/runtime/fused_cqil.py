"""The fused engine: a group of P layers run as one wide layer, for inference on one device.

Self-contained (torch, transformers and its sibling families_cqil.py; copied next to converted
weights with modeling_cqil.py, which imports it). It computes exactly what modeling_cqil.reference_step
defines, with the weights rearranged for speed: shared RMSNorm statistics with the N1 weights
folded into one q/k/v matrix, one attention call over P*heads, batched o_proj and gate/up, one
down projection with gamma folded in. Fused weights are derived from the layers' parameters
(see CqilModel.fused_steps, which rebuilds them when a parameter changes).
"""

from __future__ import annotations

import ctypes
import mmap

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .families_cqil import attention, norm_in_fp32
from .quant_cqil import QuantKernel, is_quantized


def _store_in_out(weight_dtype: torch.dtype, device: torch.device, n_in: int, n_out: int) -> bool:
    """Whether a dense fused matrix should be stored [in, out] (else [out, in], transposed on use).

    Measured on a 2-core AMD EPYC with MKL: for one-token matmuls in fp32, [in, out] streams
    the weights about 2x faster when the output is wider than the input (q/k/v, gate/up,
    lm_head), while [out, in] is faster for the narrow down projection. GPUs do not care.
    """
    return device.type == "cpu" and weight_dtype == torch.float32 and n_out > n_in


def _matrix(w_out_in: torch.Tensor) -> torch.Tensor:
    """A weight [out, in] as the [in, out] right operand of mm, in the faster layout: a view
    when the weight is stored so already (pack_members), else a copy."""
    out_dim, in_dim = w_out_in.shape
    if _store_in_out(w_out_in.dtype, w_out_in.device, in_dim, out_dim):
        return w_out_in.t() if w_out_in.t().is_contiguous() else w_out_in.t().contiguous()
    return w_out_in.t() if w_out_in.is_contiguous() else w_out_in.contiguous().t()


def _packed_view(blocks: list[list[torch.Tensor]], in_out: bool) -> torch.Tensor | None:
    """The [P, rows, in] tensor whose member j's rows are blocks[j] concatenated, when the
    parameters already are views of one such buffer in the requested layout; else None."""
    first = blocks[0][0]
    P, rows, d_in = len(blocks), sum(p.shape[0] for p in blocks[0]), first.shape[1]
    storage = first.untyped_storage()
    if first.storage_offset() != 0 or storage.nbytes() != P * rows * d_in * first.element_size():
        return None
    shape = (P, d_in, rows) if in_out else (P, rows, d_in)
    buf = torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, 0, shape)
    rows_view = buf.transpose(1, 2) if in_out else buf  # [P, rows, in]
    for j, params in enumerate(blocks):
        r = 0
        for p in params:
            v = rows_view[j, r: r + p.shape[0]]
            if p.untyped_storage().data_ptr() != storage.data_ptr() or p.dtype != first.dtype \
                    or p.storage_offset() != v.storage_offset() or p.stride() != v.stride() \
                    or p.shape != v.shape:
                return None
            r += p.shape[0]
    return rows_view


@torch.no_grad()
def pack_members(blocks: list[list[torch.Tensor]]) -> torch.Tensor:
    """Store P members' weights as one buffer, with the parameters as views into it.

    blocks[j]: member j's parameters, each [rows_i, in] (e.g. q, k, v), whose rows concatenate.
    Returns the bmm operand [P, in, rows] (a view; member j's logical weight is its [rows, in]
    transpose). The buffer is [P, in, rows] where _store_in_out prefers that layout, else
    [P, rows, in]. Parameters already laid out so are left alone (no copy); otherwise each is
    copied into a new buffer and its .data re-pointed (`p.data = view`, which keeps the
    Parameter object, its autograd identity and its optimizer state), so the old storage is
    freed and the weights are held once. In-place updates of a parameter (optimizer steps,
    copy_, load_state_dict) write into the buffer, so the fused engine sees them at once.
    """
    first = blocks[0][0]
    rows, d_in = sum(p.shape[0] for p in blocks[0]), first.shape[1]
    in_out = _store_in_out(first.dtype, first.device, d_in, rows)
    rows_view = _packed_view(blocks, in_out)
    if rows_view is None:
        with torch.inference_mode(False):  # a normal tensor: training may update it in place later
            shape = (len(blocks), d_in, rows) if in_out else (len(blocks), rows, d_in)
            buf = torch.empty(shape, dtype=first.dtype, device=first.device)
            rows_view = buf.transpose(1, 2) if in_out else buf
            mappings = file_mappings()
            for j, params in enumerate(blocks):
                r = 0
                for p in params:
                    view = rows_view[j, r: r + p.shape[0]]
                    view.copy_(p)
                    old, p.data = p.data, view
                    release_file_pages(old, mappings)
                    r += p.shape[0]
    return rows_view.transpose(1, 2)


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file mappings (Linux; [] elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].startswith("/"):
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        pass
    return ranges


def release_file_pages(old: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Drop the resident pages of a weight that was just copied out of a memory-mapped file.

    transformers loads safetensors as views of a file mapping; the pages read count in the
    process's RSS until the whole mapping goes, which is only when every tensor of the file is
    gone. Once a parameter is re-pointed (pack_members) its old pages are dead weight: they are
    dropped (madvise MADV_DONTNEED: the kernel re-reads them from the file if ever touched
    again). Only when `old` is the storage's last user (it still holds the values otherwise)
    and the storage lies inside a file mapping; never anonymous memory.
    """
    if not mappings or old.device.type != "cpu" or not old.is_contiguous():
        return
    storage = old.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    if torch._C._storage_Use_Count(storage._cdata) > 2:  # old and `storage` itself
        return
    if not any(lo <= start and end <= hi for lo, hi in mappings):
        return
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page  # whole pages inside the storage
    if hi > lo:
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED
        except (OSError, AttributeError):
            pass


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

    def __init__(self, w_out_in: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool = True):
        # prepack False: dense even where oneDNN would pack (torch.compile cannot trace the
        # packed weight, an opaque oneDNN tensor; inductor packs bf16 linears itself)
        self.packed = prepack and self.packs(w_out_in)
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


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B|1, T, hd] -> the fused engine's form [B|1, T, 1, hd], with sin sign-folded.

    rotate_half(x) * sin == roll(x, hd/2) * [-sin_1, sin_2], so RoPE is 3 ops: mul, roll, addcmul.
    """
    half = sin.shape[-1] // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos.unsqueeze(2), signed.unsqueeze(2)


def _member_modules(layer) -> tuple[list, list, list, list]:
    """A layer's linear modules, each a list whose output rows concatenate: q/k/v (Phi-3:
    qkv_proj), o_proj, gate/up (Phi-3: gate_up_proj), down_proj."""
    att, mlp = layer.self_attn, layer.mlp
    qkv = [att.qkv_proj] if att.fused else [att.q_proj, att.k_proj, att.v_proj]
    gu = [mlp.gate_up_proj] if mlp.fused else [mlp.gate_proj, mlp.up_proj]
    return qkv, [att.o_proj], gu, [mlp.down_proj]


def _member_weights(layer) -> tuple[list, list, list, list]:
    """A layer's matrices, each a list of parameters [rows_i, in] whose rows concatenate
    (_member_modules' weights)."""
    return tuple([m.weight for m in mods] for mods in _member_modules(layer))


def linear_dtype(linear) -> torch.dtype:
    """The floating dtype a linear layer computes in (dense or quant_cqil.QuantLinear)."""
    return linear.dtype if is_quantized(linear) else linear.weight.dtype


def _cat_bias(pairs) -> torch.Tensor | None:
    """[(weight, bias)] -> the biases concatenated, or None."""
    return None if pairs[0][1] is None else torch.cat([b for _, b in pairs])


@torch.no_grad()
def pack_step(layers) -> None:
    """Lay a step's matrices out as the fused engine will use them (pack_members), now: so a
    model built for it (runtime/checkpoint.py) is filled in that layout directly, instead of
    being copied into it on first use (a second copy of every layer, briefly, and heap
    fragmentation after). A no-op where the engine prepacks (CPU bf16 with oneDNN)."""
    o_proj = layers[0].self_attn.o_proj
    if is_quantized(o_proj) or FusedLinear.packs(o_proj.weight):
        return
    weights = [_member_weights(ly) for ly in layers]
    for kind in range(4):  # qkv, o, gate/up, down: as FusedStep's MemberLinears pack them
        pack_members([w[kind] for w in weights])


class MemberLinear:
    """The same map of each of P members at once: x [P, N, in] -> [P, N, out].

    Dense: one bmm over the step's packed weights [P, in, out] (pack_members: the parameters
    are views of that buffer, so nothing is copied). Prepacked bf16: P FusedLinear calls.
    Quantized (of_kernels): P quant_cqil.QuantKernel calls, each over a member's stacked rows.
    P == 1: `single`, a FusedLinear over the same storage ([N, in] -> [N, out], `add` fused).
    """

    @classmethod
    def of_kernels(cls, kernels: list) -> MemberLinear:
        """Members that are callables x [N, in] -> [N, out] (with `add`), biases included."""
        self = cls.__new__(cls)
        self.bias, self.w, self.each = None, None, kernels
        self.single = kernels[0] if len(kernels) == 1 else None
        return self

    def __init__(self, blocks: list[list[torch.Tensor]], biases: list, prepacked: bool):
        self.bias = None if biases[0] is None else torch.stack(biases)[:, None]  # [P, 1, out]
        if prepacked:
            self.each = [FusedLinear(torch.cat(ws) if len(ws) > 1 else ws[0], b)
                         for ws, b in zip(blocks, biases, strict=True)]
            self.w = None
        else:
            self.each = None
            self.w = pack_members(blocks)  # [P, in, out]
        self.single = (self.each[0] if prepacked else FusedLinear(self.w[0].t(), biases[0], prepack=False)) \
            if len(blocks) == 1 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.each is not None:
            return torch.stack([lin(x[j]) for j, lin in enumerate(self.each)])
        y = torch.bmm(x, self.w)
        return y if self.bias is None else y + self.bias


class FusedStep:
    """Inference form of one step, over its layers' own weights, and its forward.

    P layers, H heads, G kv heads, hd head dim, d hidden, I intermediate. The matrices are the
    parameters themselves, stored once per step (pack_members: each parameter is a view of the
    step's buffer, in the layout the matmul prefers): qkv [P, d, (H+2G)*hd] (member j's rows q_j,
    k_j, v_j), o [P, H*hd, d], gu [P, d, 2I] (rows gate_j, up_j), down [P, I, d], as
    MemberLinears. Nothing is folded into them; the small per-channel factors are applied to
    the activations instead:
      n1, n2    [P, 1, d] the N1_j and N2_j gains (x is normed once for the group, then scaled
                per member); fp32 in families whose norms compute in fp32 (Gemma, OLMo 2), else
                dtype; None where the family has no such norm (OLMo 2)
      qk_norm_w [P, 1, 1, H+G, hd] per-head q/k norm gains (qwen3, gemma3), member-major; or
                q_norm_w [P, 1, 1, H*hd], k_norm_w [P, 1, 1, G*hd], gains of q/k norms over the
                whole projection (OLMo 2)
      r         Granite's residual multiplier (a_j and m_j times r), else None
      gamma [P, 1, d]; mix [P, P, 1, d] (a_j + b_j = sum_k mix[j, k] * a_k)
      post-norms (Gemma, OLMo 2): post_attn [P, 1, d] the Na_j gains; post_ff [P, 1, d] the Nf_j gains
             (times gamma_j in a group), fp32 (these norms run in fp32)
    Rebuilding a FusedStep is cheap (the big matrices are not copied), which is what
    CqilModel.fused_steps does after any parameter changed.
    """

    def __init__(self, layers, config, prepack: bool = True):
        L = layers
        self.P = P = len(L)
        self.H, self.G, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.eps = config.rms_norm_eps
        self.silu = config.hidden_act in ("silu", "swish")
        self.act = ACT2FN[config.hidden_act]
        att = [ly.self_attn for ly in L]
        self.scale, self.cap = att[0].scale, att[0].cap
        self.post_norms = bool(getattr(config, "post_norms", False))
        self.fp32_gains = self.post_norms or norm_in_fp32(config)
        self.r = L[0].residual_multiplier
        dtype = linear_dtype(att[0].o_proj)
        f32 = torch.float32

        def gains(norms, scales=None) -> torch.Tensor | None:  # [P, 1, d]
            if norms[0] is None:  # the family has no such norm
                return None
            g = torch.stack([n.gain().to(f32) for n in norms])
            g = g if scales is None else g * scales
            return (g if self.fp32_gains else g.to(dtype))[:, None, :].contiguous()

        quantized = is_quantized(att[0].o_proj)
        prepacked = prepack and not quantized and FusedLinear.packs(att[0].o_proj.weight)
        self.batched = not (prepacked or quantized)  # one bmm over the members; False: P calls
        if quantized:  # one kernel per member and matrix, over its stacked q/k/v (gate/up) rows
            # (measured: one call over all members' rows with P input rows is slower than P
            # calls, as the kernels are bound by the weight bytes either way)
            modules = [_member_modules(ly) for ly in L]
            self.qkv, self.o, self.gu, self.down = (
                MemberLinear.of_kernels([QuantKernel(m[kind]) for m in modules]) for kind in range(4))
        else:
            weights = [_member_weights(ly) for ly in L]
            qkv_bias = [_cat_bias(a.qkv_weights()) for a in att]
            gu_bias = [_cat_bias(ly.mlp.gate_up_weights()) for ly in L]
            self.qkv = MemberLinear([w[0] for w in weights], qkv_bias, prepacked)
            self.o = MemberLinear([w[1] for w in weights], [a.o_proj.bias for a in att], prepacked)
            self.gu = MemberLinear([w[2] for w in weights], gu_bias, prepacked)
            self.down = MemberLinear([w[3] for w in weights], [ly.mlp.down_proj.bias for ly in L], prepacked)
        self.n1 = gains([ly.attn_norm for ly in L])
        self.n2 = gains([ly.mlp_norm for ly in L])
        self.qk_norm_w = self.q_norm_w = self.k_norm_w = None
        if att[0].q_norm is not None and att[0].qk_norm_whole:  # [P, 1, 1, H*hd | G*hd]
            self.q_norm_w = torch.stack([a.q_norm.gain().to(f32) for a in att])[:, None, None]
            self.k_norm_w = torch.stack([a.k_norm.gain().to(f32) for a in att])[:, None, None]
        elif att[0].q_norm is not None:
            qk = [torch.cat([a.q_norm.gain()[None].expand(self.H, -1), a.k_norm.gain()[None].expand(self.G, -1)])
                  for a in att]  # per member [H+G, hd]
            qk_w = torch.stack(qk)[:, None, None].contiguous()  # [P, 1, 1, H+G, hd]
            self.qk_norm_w = qk_w.to(f32) if self.post_norms else qk_w.to(dtype)
        gamma = torch.stack([ly.cqil_gamma.to(f32) for ly in L]) if P > 1 else None  # [P, d]
        if self.post_norms:
            self.post_attn = gains([ly.attn_output_norm for ly in L])
            self.post_ff = gains([ly.post_feedforward_layernorm for ly in L], gamma)
        if P == 1:
            return
        self.gamma = gamma.to(dtype)[:, None, :].contiguous()  # [P, 1, d]
        self.mix = None
        if any(ly.cqil_beta is not None for ly in L):
            mix = torch.zeros(P, P, gamma.shape[-1], dtype=f32, device=gamma.device)
            for j, ly in enumerate(L):
                mix[j, j] = 1.0
                if ly.cqil_beta is not None:
                    n_beta = ly.cqil_beta.shape[0]
                    mix[j, j - n_beta: j] = ly.cqil_beta.to(f32)
            self.mix = mix.to(dtype)[:, :, None, :].contiguous()  # [P, P, 1, d]

    def _act(self, gu: torch.Tensor) -> torch.Tensor:
        g, u = gu.chunk(2, dim=-1)
        return (F.silu(g) if self.silu else self.act(g)) * u

    def _norm(self, t: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """RMSNorm of t [..., d] over its last dimension, times gain (fp32, [d] or [P, 1, d]),
        computed in fp32 and rounded once, as Gemma's norms are."""
        return (F.rms_norm(t.float(), (t.shape[-1],), eps=self.eps) * gain).to(t.dtype)

    def _gain_norm(self, t: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """The RMSNorm of t [N, d] or [P, N, d] times the members' gains [P, 1, d] -> [P, N, d]
        (P == 1: [N, d]), computed as the family's norm computes it; gain None (the family has
        no such norm): t itself, broadcast to [P, N, d]."""
        if gain is None:
            return t if self.P == 1 or t.dim() == 3 else t.expand(self.P, *t.shape)
        if self.P == 1:
            gain = gain[0, 0]
        if self.fp32_gains:
            return self._norm(t, gain)
        if self.P == 1:
            return F.rms_norm(t, (t.shape[-1],), weight=gain, eps=self.eps)
        return F.rms_norm(t, (t.shape[-1],), eps=self.eps) * gain

    def _rope(self, qk: torch.Tensor, cos, sin) -> torch.Tensor:
        """RoPE of qk [..., heads, hd] on the first r channels of cos/sin [..., 1|heads, r]
        (sin sign-folded, see rope_tables): 3 ops, q*cos + roll(q)*sin."""
        r = cos.shape[-1]
        if r == self.hd:
            return torch.addcmul(qk * cos, qk.roll(r // 2, -1), sin)
        rot = qk[..., :r]  # partial rotary (Phi-3): the other channels pass unchanged
        return torch.cat([torch.addcmul(rot * cos, rot.roll(r // 2, -1), sin), qk[..., r:]], dim=-1)

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
        N, hd, P, H, G = B * T, self.hd, self.P, self.H, self.G
        x2 = x.reshape(N, d)
        # N1 of all P layers shares the statistics of x; each member then scales by its gain.
        xn = self._gain_norm(x2, self.n1)  # [P, N, d] ([N, d] when P == 1)
        qkv = self.qkv.single(xn) if P == 1 else self.qkv(xn)  # [(P,) N, (H+2G)*hd]
        qkv = qkv.view(P, B, T, H + 2 * G, hd)  # member j: its q, k, v heads
        qk, v = qkv[..., : H + G, :], qkv[..., H + G:, :]  # [P, B, T, H+G, hd], [P, B, T, G, hd]
        if self.q_norm_w is not None:  # OLMo 2: over all heads of each member's q, and of its k
            q = self._norm(qk[..., :H, :].reshape(P, B, T, H * hd), self.q_norm_w)
            k = self._norm(qk[..., H:, :].reshape(P, B, T, G * hd), self.k_norm_w)
            qk = torch.cat([q.view(P, B, T, H, hd), k.view(P, B, T, G, hd)], dim=-2)
        elif self.qk_norm_w is not None and self.post_norms:  # gemma3: in fp32, as its norms
            qk = self._norm(qk, self.qk_norm_w)
        elif self.qk_norm_w is not None:
            qk = F.rms_norm(qk, (hd,), eps=self.eps) * self.qk_norm_w
        if isinstance(cos, list):  # members with their own RoPE (Gemma 3's local base)
            cos, sin = torch.stack(cos), torch.stack(sin)  # [P, B|1, T, 1, r]
        # RoPE once over every q and k head of the group (sin is sign-folded, see rope_tables).
        qk = self._rope(qk, cos, sin)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [P, B, T, n, hd] -> [B, P*n, T, hd], layer-major
            return t.permute(1, 0, 3, 2, 4).reshape(B, -1, T, hd)

        q, k, v = heads(qk[..., :H, :]), heads(qk[..., H:, :]), heads(v)
        if cache is not None:
            k, v = cache.update(k, v, step_idx)  # [B, P*G, S, hd]
        o = self._attend(q, k, v, mask, is_causal)  # [B, P*H, T, hd]
        o = o.transpose(1, 2).reshape(N, P, -1)  # [N, P, H*hd]
        if P == 1:
            n2, r = self.n2, self.r
            if self.post_norms:  # h = x + Na(o W_o); y = h + Nf(down(act))
                h = x2 + self._norm(self.o.single(o[:, 0]), self.post_attn[0, 0])
                act = self._act(self.gu.single(self._gain_norm(h, n2)))
                return (h + self._norm(self.down.single(act), self.post_ff[0, 0])).view(B, T, d)
            if r is not None:  # Granite: h = x + r·a; y = h + r·m
                h = x2 + self.o.single(o[:, 0]) * r
                act = self._act(self.gu.single(self._gain_norm(h, n2)))
                return (h + self.down.single(act) * r).view(B, T, d)
            h = self.o.single(o[:, 0], add=x2)  # x + a
            act = self._act(self.gu.single(self._gain_norm(h, n2)))  # [N, I]
            return self.down.single(act, add=h).view(B, T, d)
        a = self.o(o.transpose(0, 1))  # [P, N, d]
        if self.post_norms:
            a = self._norm(a, self.post_attn)  # a_j = Na_j(...)
        if self.r is not None:
            a = a * self.r  # Granite: a_j = r·(o_j W_o)
        z = a if self.mix is None else (self.mix * a[None]).sum(1)  # a_j + b_j, [P, N, d]
        act = self._act(self.gu(self._gain_norm(x2 + z, self.n2)))  # [P, N, I]
        m = self.down(act)  # [P, N, d]
        if self.r is not None:
            m = m * self.r  # Granite: m_j = r·F(...)
        if self.post_norms:  # sum_j gamma_j Nf_j(m_j), gamma_j folded into the Nf_j gain
            return (x2 + (a * self.gamma).sum(0) + self._norm(m, self.post_ff).sum(0)).view(B, T, d)
        return (x2 + ((a + m) * self.gamma).sum(0)).view(B, T, d)  # x + sum_j gamma_j (a_j + m_j)


__all__ = ["FusedLinear", "FusedStep", "MemberLinear", "linear_dtype", "pack_members", "pack_step", "rope_tables"]
