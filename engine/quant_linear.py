"""Weight-only quantized Linear layers, swapped into the unmodified transformers model.

    Int8Linear   w[o, i] ~= q[o, i] * scale[o]                 q int8, one scale per output row
    Int4Linear   w[o, i] ~= q[o, i] * d[o, g] + m[o, g]        q in 0..15, g = i // 32: GGUF's
                                                              Q4_1 block (scale d and min m)

The kernels are torch's packed CPU GEMMs (at batch 1 on the tied lm_head [49152, 576], 2-vCPU
avx512_bf16 box: bf16 dense 5.2 ms, int8 `_weight_int8pack_mm` 2.7 ms, int4
`_weight_int4pack_mm_for_cpu` 0.9 ms; issue 19), run in bf16 whatever the model's dtype: their
fp32 variants are reference loops (same box, [rows, 576] x [576, 1536]: int4 fp32 8 ms at 1 row
and 758 ms at 512 rows, bf16 0.06 ms and 12 ms; int8 fp32 6 ms and 397 ms, bf16 0.04 ms and
19 ms). So an fp32 model's activations are rounded to bf16 at each quantized layer and the
output cast back; the rest of the model (norms, attention, residuals) stays fp32. CPU only:
engine/quantize.py refuses another device (a CUDA path would take torchao's kernels).

tinygemm's int4 convention is w = (q - 8) * scale + zero, so a Q4_1 block maps with scale = d
and zero = m + 8 d, both rounded to bf16 (the kernel's dtype; docs/BENCHMARKS.md gives the
largest difference from the GGUF's own q * d + m).
"""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32  # int4 group size along the input dim: GGUF's Q4_1 block
KERNEL_DTYPE = torch.bfloat16  # see the docstring: the fp32 kernels are reference loops
_INNER_K_TILES = 1  # what _convert_weight_to_int4pack_for_cpu takes on CPU


class _QuantLinear(nn.Module):
    """[..., in] -> [..., out]: the packed kernel in bf16 on 2-D rows, cast back, + bias."""

    in_features: int
    out_features: int

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:  # [rows, in] bf16 -> [rows, out]
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._mm(x.reshape(-1, self.in_features).to(KERNEL_DTYPE)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Int8Linear(_QuantLinear):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.contiguous())  # int8 [out, in]
        self.register_buffer("scale", scale.to(KERNEL_DTYPE).contiguous())  # [out]
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Symmetric per-row int8 of a float weight [out, in]."""
        x = w.float()
        scale = x.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [out]
        q = torch.clamp(torch.round(x / scale[:, None]), -127, 127).to(torch.int8)
        return cls(q, scale, bias, w.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]  # [out, in] fp32

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)


class Int4Linear(_QuantLinear):
    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                 bias: torch.Tensor | None, dtype: torch.dtype):
        """q: int [out, in] in 0..15; d, m: float [out, in // GROUP] (scale and min)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        assert self.in_features % GROUP == 0, self.in_features
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), _INNER_K_TILES)  # uint8 [out, in / 2]
        self.register_buffer("packed", packed)
        zero = m.float() + 8.0 * d.float()  # tinygemm: w = (q - 8) * scale + zero
        sz = torch.stack([d.float().t(), zero.t()], dim=-1)  # [in / GROUP, out, 2]
        self.register_buffer("scales_zeros", sz.to(KERNEL_DTYPE).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> Int4Linear:
        """Asymmetric int4 per group of 32 inputs (the Q4_1 format) of a float weight."""
        out, inp = w.shape
        g = w.float().reshape(out, inp // GROUP, GROUP)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [out, in / GROUP]
        d = ((hi - lo) / 15.0).clamp_min(1e-12)
        q = torch.clamp(torch.round((g - lo[..., None]) / d[..., None]), 0, 15)
        return cls(q.reshape(out, inp), d, lo, bias, w.dtype)

    def dequantized(self) -> torch.Tensor:
        """[out, in] fp32, what the kernel multiplies by (scale and zero as stored)."""
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP,
                                                          self.scales_zeros)  # [in, out]
        return w_t.float().t()

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP,
                                                          self.scales_zeros)
