"""Quantized KV (`--kv-dtype int8|uint4`): each key and value vector of one token and head is
stored as bytes with its own scale, in the same places an exact one would be.

    exact   [..., D]       the model's dtype
    int8    [..., D + 4]   int8: round(x / s), s = max|x| / 127, then s (fp32) as 4 bytes
    uint4   [..., D/2 + 4] uint8: round((x - m) / s) in 0..15, two per byte (even index in the
                           low nibble), s = (max - min) / 15 and m = min as fp16, 2 bytes each

A stored row carries its scale, so the pool, pages, store blocks, cold segments and the
handoff keep their shapes with D replaced by the row's byte width, and move bytes as before:
KVLayout describes the stored row (engine/kv_layout.py). Attention dequantizes what it reads
to the model's dtype (engine/step_plan.py); the step's own new keys are attended at full
precision where attention takes them straight from the forward (a prompt from position 0).

Scales per token and head: a row's error depends on its own
range only, so an outlier token does not cost the others precision. Within a row, a few
channels of a key often dwarf the rest, and a scale set by them leaves the others a handful of
levels. So a quantized row is first rotated by the normalised Hadamard matrix R (orthonormal
and symmetric, entries +-1/sqrt(D); the outlier channels KIVI and QuaRot describe), which
spreads an outlier over every channel. Attention never rotates keys back: q . (R k) = (R q) . k, and
sum p (R v) = R (sum p v), so the query is rotated once and the output once
(engine/step_plan.py), D x D per query row instead of per key. Measured on 50 prompts x 64
tokens (docs/BENCHMARKS.md, "KV quantization"), the perplexity of the model's own greedy text
rose by 16.9% with uint4 unrotated and 4.8% rotated; by 0.11% and 0.02% with int8.

Bytes per token for SmolLM2 (30 layers, 3 KV heads, D = 64): fp32 46,080, bf16 23,040, int8
12,240, uint4 6,480.
"""

from __future__ import annotations

import torch

KV_DTYPES = ("auto", "int8", "uint4")


def row_width(quant: str | None, head_dim: int) -> int:
    """Elements of one stored row (bytes for a quantized one)."""
    if quant == "int8":
        return head_dim + 4
    if quant == "uint4":
        if head_dim % 2:
            raise ValueError(f"uint4 KV needs an even head_dim, not {head_dim}")
        return head_dim // 2 + 4
    return head_dim


def storage_dtype(quant: str | None, model_dtype: torch.dtype) -> torch.dtype:
    return {"int8": torch.int8, "uint4": torch.uint8}.get(quant, model_dtype)


def rotation(head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The normalised Hadamard matrix [D, D] (Sylvester's construction), or None where D is
    not a power of two (rows are then quantized unrotated)."""
    if head_dim & (head_dim - 1):
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < head_dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / head_dim ** 0.5).to(dtype=dtype, device=device)


def quantize(x: torch.Tensor, quant: str) -> torch.Tensor:
    """x [..., D] (any float dtype) -> stored rows [..., row_width(quant, D)]."""
    xf = x.float()
    if quant == "int8":
        scale = xf.abs().amax(-1, keepdim=True) / 127  # [..., 1]
        q = torch.round(xf / torch.where(scale > 0, scale, 1.0)).to(torch.int8)
        return torch.cat([q, scale.view(torch.int8)], dim=-1)
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale, low = ((hi - lo) / 15).half(), lo.half()  # stored as fp16: dequantize with these
    s = scale.float()
    q = torch.round((xf - low.float()) / torch.where(s > 0, s, 1.0)).clamp(0, 15).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    tail = torch.cat([scale, low], dim=-1).view(torch.uint8)  # [..., 4]
    return torch.cat([packed, tail], dim=-1)


def dequantize(q: torch.Tensor, quant: str, dtype: torch.dtype) -> torch.Tensor:
    """Stored rows [..., W] (any strides) -> [..., D] in `dtype`."""
    if quant == "int8":
        scale = q[..., -4:].contiguous().view(torch.float32)  # [..., 1]
        return (q[..., :-4].float() * scale).to(dtype)
    tail = q[..., -4:].contiguous().view(torch.float16).float()  # [..., 2]: scale, min
    packed = q[..., :-4]
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)  # [..., D]
    return (nibbles.float() * tail[..., :1] + tail[..., 1:]).to(dtype)
