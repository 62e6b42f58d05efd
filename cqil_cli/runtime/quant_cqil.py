"""Weight-only int8 / int4 linear layers: the stored format, the reference and the fast kernels.

Self-contained (torch only; copied next to converted weights, docs/runtime.md). A quantized
folder's config carries `weights` (WeightScheme.to_json()); CqilForCausalLM swaps the linear
layers it names for QuantLinear before the weights load.

Format (what model.safetensors stores for a linear layer `p` [out, in]):
  int8  p.qweight int8  [out, in]       codes q in [-127, 127]
        p.scales  float [out, 1]        w = q * s                 (symmetric, per output channel)
  int4  p.qweight uint8 [out, in/2]     codes q in [0, 15], column 2c in the low nibble of
                                        byte c, column 2c+1 in the high one
        p.scales  float [out, in/G]     w = (q - 8) * s + z       (asymmetric, per group of G
        p.zeros   float [out, in/G]     z: the value of code 8    input columns)
  p.bias as before. Scales and zeros are rounded to bf16 when quantizing, whatever the dtype they
  are stored or loaded in, so every engine dequantizes to exactly the same weights (the CPU
  kernels take them in bf16).

Two ways to run one (x [..., in] -> [..., out]):
  QuantLinear.forward   the reference: dequantize to x's dtype, then F.linear. Obvious, any
                        device, differentiable in x; what every fast path is tested against.
  QuantKernel           the fast path (fused engine, fast generation, distributed shards): on a
                        CPU, torch's weight-only kernels (aten _weight_int8pack_mm and
                        _weight_int4pack_mm_for_cpu, activations in bf16, measured ~6x faster
                        than an fp32 F.linear at one token on a 2-core EPYC: docs/performance.md);
                        where a kernel does not apply (other devices, shapes it refuses), the
                        reference computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMATS = ("int8", "int4")
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel takes
SCALE_DTYPE = torch.bfloat16  # scales and zeros are rounded to it (the kernels' input)


@dataclass(frozen=True)
class WeightScheme:
    """How a folder's linear layers are stored (config.weights; docs/convert.md "weights").

    format: int8 | int4 for the layers' linears; head: the lm_head's format (int8, or None to
    keep it dense); group_size: int4's input columns per scale; method: how the codes were
    chosen (rtn: round to nearest; gptq; local: trained through the rounding), recorded for
    people, not needed to load.
    """

    format: str
    group_size: int | None = None
    head: str | None = "int8"
    method: str = "rtn"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"weights must be one of {', '.join(FORMATS)}, got '{self.format}'")
        if self.head not in (None, *FORMATS):
            raise ValueError(f"head weights must be one of {', '.join(FORMATS)} or none, got '{self.head}'")
        if self.format == "int4" and (not self.group_size or self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"int4 needs an even group size, got {self.group_size}")

    def bits(self, fmt: str) -> int:
        return 8 if fmt == "int8" else 4

    def to_json(self) -> dict:
        return {"format": self.format, "group_size": self.group_size, "head": self.head, "method": self.method}

    @classmethod
    def from_json(cls, data) -> WeightScheme | None:
        if not data:
            return None
        return cls(format=data["format"], group_size=data.get("group_size"), head=data.get("head", "int8"),
                   method=data.get("method", "rtn"))


# ----------------------------------------------------------------------------- codes


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] (0..15, in even) -> uint8 [out, in/2], column 2c low nibble of byte c."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> codes uint8 [out, in] (the inverse of pack_int4)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(SCALE_DTYPE).float()


def int8_scales(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] -> per-row scales [out, 1] (fp32 holding bf16 values): max|w| / 127."""
    s = _bf16_round(w.float().abs().amax(dim=1, keepdim=True) / 127.0)
    return torch.where(s > 0, s, torch.ones_like(s))


def int4_params(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (scales, zeros) [out, in/G] (fp32 holding bf16 values): the group's range
    over the 16 codes, z its value at code 8 (round-to-nearest's choice; GPTQ calls it per group
    on the weights as updated so far)."""
    g = w.float().reshape(w.shape[0], -1, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    s = _bf16_round((hi - lo) / 15.0)
    s = torch.where(s > 0, s, torch.full_like(s, 2.0 ** -24))  # a constant group: any step, exact in bf16
    z = _bf16_round(lo + 8.0 * s)
    return s, z


def codes_for(w: torch.Tensor, bits: int, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int | None) -> torch.Tensor:
    """Round w [out, in] to codes under given scales (and zeros): int8 [out, in] in -127..127,
    or uint8 [out, in] in 0..15 (unpacked)."""
    w = w.float()
    if bits == 8:
        return torch.clamp(torch.round(w / scales), -127, 127).to(torch.int8)
    s = scales.repeat_interleave(group_size, dim=1)
    z = zeros.repeat_interleave(group_size, dim=1)
    return torch.clamp(torch.round((w - z) / s) + 8, 0, 15).to(torch.uint8)


def dequantize_codes(q: torch.Tensor, bits: int, scales: torch.Tensor, zeros: torch.Tensor | None,
                     group_size: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in] that codes (int8, or unpacked int4 0..15) and their scales stand for,
    computed in fp32 and rounded once to dtype."""
    if bits == 8:
        return (q.float() * scales.float()).to(dtype)
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return ((q.float() - 8.0) * s + z).to(dtype)


def round_to_nearest(w: torch.Tensor, fmt: str, group_size: int | None = None) -> tuple:
    """w [out, in] -> (codes [out, in]: int8, or int4's unpacked to uint8 0..15; scales; zeros
    or None), round to nearest's choice (fp32 scales holding bf16 values)."""
    if fmt == "int8":
        s = int8_scales(w)
        return codes_for(w, 8, s, None, None), s, None
    if w.shape[1] % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the {w.shape[1]} input columns")
    s, z = int4_params(w, group_size)
    return codes_for(w, 4, s, z, group_size), s, z


def quantize_weight(w: torch.Tensor, fmt: str, group_size: int | None = None) -> dict:
    """Round-to-nearest: w [out, in] -> the stored tensors {qweight, scales[, zeros]} (fp32 scales)."""
    q, s, z = round_to_nearest(w, fmt, group_size)
    if fmt == "int8":
        return {"qweight": q, "scales": s}
    return {"qweight": pack_int4(q), "scales": s, "zeros": z}


# ----------------------------------------------------------------------------- modules


class QuantLinear(nn.Module):
    """A weight-only quantized nn.Linear (the format in the module docstring).

    forward is the reference (dequantize, F.linear); kernel() the fast path for the engines
    (forward runs it instead when use_kernel is set: the distributed engine sets it).
    Buffers, not parameters: the codes are not trained (calibrate/ trains a dense copy and
    quantizes it again).
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int | None = None,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
        self.in_features, self.out_features, self.format = in_features, out_features, fmt
        self.bits = 8 if fmt == "int8" else 4
        self.group_size = group_size if self.bits == 4 else None
        if self.bits == 4 and (not group_size or in_features % group_size or group_size % 2):
            raise ValueError(f"int4 group size {group_size} does not divide the {in_features} input columns")
        dtype = dtype or torch.get_default_dtype()
        if self.bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, 1, dtype=dtype, device=device))
            self.zeros = None
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._kernel: QuantKernel | None = None
        self._kernel_key: tuple | None = None
        # True: forward is kernel()'s (the distributed engine's shards, whose layer code calls
        # the modules); False: the reference
        self.use_kernel = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int | None = None,
                    stored: dict | None = None) -> QuantLinear:
        """Quantize a dense layer (round-to-nearest, or the given stored tensors: GPTQ's)."""
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, fmt, group_size, linear.bias is not None,
                device=w.device, dtype=w.dtype)
        q.load_codes(stored if stored is not None else quantize_weight(w, fmt, group_size))
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    @torch.no_grad()
    def load_codes(self, stored: dict) -> None:
        """Fill the buffers from {qweight, scales[, zeros]} (quantize_weight's output)."""
        for name, value in stored.items():
            buf = getattr(self, name)
            if tuple(value.shape) != tuple(buf.shape) or (name == "qweight" and value.dtype != buf.dtype):
                raise ValueError(f"{name}: {value.dtype} {tuple(value.shape)}, expected {buf.dtype} {tuple(buf.shape)}")
            buf.copy_(value)

    def codes(self) -> torch.Tensor:
        """The codes [out, in]: int8, or int4's unpacked to uint8 0..15."""
        return self.qweight if self.bits == 8 else unpack_int4(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] the layer stands for, in dtype."""
        return dequantize_codes(self.codes(), self.bits, self.scales, self.zeros, self.group_size, dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the layer computes in (its scales', which follow model.to())."""
        return self.scales.dtype

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.bias)
                   if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            return self.kernel()(x)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def kernel(self) -> QuantKernel:
        """The fast path over this layer's tensors (cached; rebuilt when a buffer changes)."""
        if self._kernel is None or self._kernel_key != _tensor_key(self.qweight, self.scales, self.zeros):
            self._kernel = QuantKernel([self])  # may re-point qweight (aligned): key after it
            self._kernel_key = _tensor_key(self.qweight, self.scales, self.zeros)
        return self._kernel

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{group}, bias={self.bias is not None}"


def _tensor_key(*tensors) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors if t is not None)


def _aligned_codes(layers: list[QuantLinear], qweight: torch.Tensor) -> torch.Tensor:
    """int8 codes [n_out, in] in memory the CPU kernel can read, held once: the kernel crashes
    on weights not 64-byte aligned (a tensor loaded from a safetensors mapping is aligned to 8
    at best), so a single layer's codes are copied into fresh (aligned) memory when needed, and
    the layers' buffers re-pointed at the kernel's tensor (stacked layers: views of its rows)."""
    if len(layers) == 1 and qweight.is_contiguous() and qweight.data_ptr() % 64 == 0:
        return qweight
    if len(layers) == 1:
        qweight = qweight.contiguous().clone()  # torch's CPU allocator aligns to 64 bytes
    row = 0
    for ly in layers:
        ly.qweight = qweight[row: row + ly.out_features]  # a view: the codes are held once
        row += ly.out_features
    return qweight


def _int8_kernel_ok(device: torch.device, n_in: int) -> bool:
    # torch 2.13's CPU kernel reads out of bounds when K is not a multiple of 16 (measured:
    # wrong values or a crash for K = 7, 8, 12, 40, 100), so those shapes take the reference.
    return device.type == "cpu" and n_in % 16 == 0 and hasattr(torch, "_weight_int8pack_mm")


def _int4_kernel_ok(device: torch.device, n_out: int, group_size: int) -> bool:
    return (device.type == "cpu" and n_out % 16 == 0 and group_size in INT4_KERNEL_GROUPS
            and hasattr(torch, "_weight_int4pack_mm_for_cpu"))


class QuantKernel:
    """y = x W^T (+ bias) (+ add) for x [N, in], W the rows of one or more QuantLinears of one
    format stacked (a fused q/k/v: one call instead of three). Callable like
    fused_cqil.FusedLinear, which the engines use for dense weights.

    CPU: the activations are rounded to bf16 for the kernel (it accumulates in fp32) and the
    result returned in x's dtype: within bf16 rounding (~1e-2 relative) of the reference.
    Other devices and shapes the kernels refuse: the reference, over the stacked dequantized
    weight computed on each call (nothing dense is kept: the bytes are the point).
    """

    def __init__(self, layers: list[QuantLinear]):
        first = layers[0]
        if any(ly.format != first.format or ly.group_size != first.group_size
               or ly.in_features != first.in_features for ly in layers):
            raise ValueError("a QuantKernel stacks layers of one format, group size and input width")
        self.bits, self.group_size, self.n_in = first.bits, first.group_size, first.in_features
        self.n_out = sum(ly.out_features for ly in layers)
        cat = (lambda ts: ts[0]) if len(layers) == 1 else (lambda ts: torch.cat(ts))
        qweight = cat([ly.qweight for ly in layers])
        scales = cat([ly.scales for ly in layers])
        zeros = cat([ly.zeros for ly in layers]) if self.bits == 4 else None
        biases = [ly.bias for ly in layers]
        self.bias = None if biases[0] is None else cat([b.detach() for b in biases])
        device = qweight.device
        self.mode = "reference"
        if self.bits == 8 and _int8_kernel_ok(device, self.n_in):
            self.mode = "int8"
            self.qweight = _aligned_codes(layers, qweight)
            self.scales = scales.reshape(-1).to(SCALE_DTYPE, copy=True)
        elif self.bits == 4 and _int4_kernel_ok(device, self.n_out, self.group_size):
            self.mode = "int4"
            codes = unpack_int4(qweight).to(torch.int32)
            self.packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            # [in/G, out, 2]: the kernel's scale-and-zero table, w = (q - 8) * s + z
            self.scale_zero = torch.stack([scales.t(), zeros.t()], dim=-1).to(SCALE_DTYPE).contiguous()
        else:
            self.qweight, self.scales, self.zeros = qweight, scales, zeros

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.mode == "int8":
            y = torch._weight_int8pack_mm(x2.to(SCALE_DTYPE).contiguous(), self.qweight, self.scales).to(x.dtype)
        elif self.mode == "int4":
            y = torch._weight_int4pack_mm_for_cpu(x2.to(SCALE_DTYPE).contiguous(), self.packed,
                                                  self.group_size, self.scale_zero).to(x.dtype)
        else:
            w = dequantize_codes(self.qweight if self.bits == 8 else unpack_int4(self.qweight), self.bits,
                                 self.scales, self.zeros, self.group_size, x.dtype)
            y = x2 @ w.t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if add is not None:
            y = y + add.reshape(y.shape)
        return y.reshape(*shape[:-1], self.n_out)


def quantized_linears(module: nn.Module) -> list[QuantLinear]:
    return [m for m in module.modules() if isinstance(m, QuantLinear)]


def is_quantized(linear) -> bool:
    return isinstance(linear, QuantLinear)


def swap_linears(model: nn.Module, scheme: WeightScheme, stored: dict | None = None) -> None:
    """Replace the decoder layers' nn.Linear modules (and lm_head, when scheme.head) by
    QuantLinear: quantized from their weights (round to nearest, or `stored`: qualified name ->
    the tensors GPTQ chose), or, on the meta device, empty shells that loading fills. The layers:
    model.model.layers or model.layers, a list, or a ModuleDict keyed by layer index (a
    distributed shard's, sharding_cqil.CqilShard)."""
    layers = model.model.layers if hasattr(model, "model") else model.layers
    indexed = layers.items() if isinstance(layers, nn.ModuleDict) else enumerate(layers)
    targets = [(f"model.layers.{i}.{name}", layer, name, scheme.format)
               for i, layer in indexed for name, m in layer.named_modules()
               if isinstance(m, nn.Linear)]
    if scheme.head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        targets.append(("lm_head", model, "lm_head", scheme.head))
    for qualified, owner, name, fmt in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = owner.get_submodule(parent_name) if parent_name else owner
        linear = getattr(parent, attr)
        group = scheme.group_size if fmt == "int4" else None
        if linear.weight.device.type == "meta":
            q = QuantLinear(linear.in_features, linear.out_features, fmt, group, linear.bias is not None,
                            device="meta", dtype=linear.weight.dtype)
        else:
            q = QuantLinear.from_linear(linear, fmt, group, (stored or {}).get(qualified))
        setattr(parent, attr, q)


def check_quantized(model: nn.Module, where: str) -> None:
    """Refuse a loaded quantized model whose scales are not finite and positive (a tampered or
    mismatched tensor) with one line; shapes and dtypes are checked as the weights load."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            s = m.scales.float()
            if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                raise ValueError(f"{where}: {name}.scales holds values that are not finite and positive; "
                                 "the file is damaged or was edited")
            if m.zeros is not None and not bool(torch.isfinite(m.zeros.float()).all()):
                raise ValueError(f"{where}: {name}.zeros holds values that are not finite; the file is damaged or was edited")
            if m.qweight.dtype != (torch.int8 if m.bits == 8 else torch.uint8):
                raise ValueError(f"{where}: {name}.qweight is {m.qweight.dtype}; the {m.format} format stores "
                                 f"{'int8' if m.bits == 8 else 'uint8'}")


__all__ = ["FORMATS", "QuantKernel", "QuantLinear", "WeightScheme", "check_quantized", "dequantize_codes",
           "is_quantized", "pack_int4", "quantize_weight", "quantized_linears", "round_to_nearest",
           "swap_linears", "unpack_int4"]
