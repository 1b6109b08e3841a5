"""`--quantization none|int8|int4`: swap a loaded model's Linear layers for weight-only
quantized ones (engine/quant_linear.py), in place, keeping the transformers model code.

    int8   q/k/v/o, gate/up/down and the lm_head: int8, one scale per output row
    int4   q/k/v/o, gate/up/down: 4-bit groups of 32 with scale and min (Q4_1), read straight
           from the GGUF's own blocks when the model came from one (engine/gguf_q4.py), else
           quantized from the weights; the lm_head: int8 per row (GGUF keeps its tied
           embedding/output at 8 bits too: Q8_0)

Embeddings and norms stay in the model's dtype. The lm_head is tied to the embedding in
SmolLM2: the embedding keeps its weight for lookups, the head gets a quantized copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from engine.derived import PROJECTIONS
from engine.gguf_q4 import read_q4_1
from engine.quant_linear import Int4Linear, Int8Linear

log = logging.getLogger(__name__)

MODES = ("none", "int8", "int4")


def quantize_model(model: nn.Module, mode: str, gguf: Path | None = None) -> int:
    """Swap in quantized layers; returns how many. `gguf`: the file the weights came from."""
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return 0
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("--quantization runs on CPU only (its kernels are torch's packed CPU "
                         "GEMMs); use --quantization none on this device")
    blocks = {}
    if mode == "int4" and gguf is not None:
        cfg = model.config
        blocks = read_q4_1(gguf, cfg.num_attention_heads, cfg.num_key_value_heads)
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in PROJECTIONS:
            _replace(model, name, _projection(module, mode, blocks.get(f"{name}.weight")))
            swapped += 1
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(Int8Linear.from_weight(head.weight.detach(), head.bias))
        model.config.tie_word_embeddings = False  # nothing may re-tie the quantized head
        swapped += 1
    log.info("quantized %d Linear layers to %s (%d from the GGUF's own Q4_1 blocks)",
             swapped, mode, len(blocks))
    return swapped


def _projection(linear: nn.Linear, mode: str, block: tuple | None) -> nn.Module:
    w, bias = linear.weight.detach(), linear.bias
    if mode == "int8":
        return Int8Linear.from_weight(w, bias)
    if block is not None:
        q, d, m = block
        return Int4Linear(q, d, m, bias, w.dtype)
    return Int4Linear.from_weight(w, bias)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of every parameter and buffer (a tied tensor counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.data_ptr() if t.layout == torch.strided else id(t)  # oneDNN-packed: opaque
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
