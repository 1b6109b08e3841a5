"""A GGUF's Q4_1 projection weights, read as 4-bit blocks (never through fp32) for Int4Linear.

    Q4_1 block, 20 bytes for 32 weights along the input dim:
        d  fp16    scale
        m  fp16    min
        qs 16 B    nibbles: weight j is qs[j] & 0xF, weight j + 16 is qs[j] >> 4   (j < 16)
    w = q * d + m

GGUF stores a Llama's q_proj and k_proj rows permuted for llama.cpp's rotary layout
(convert_hf_to_gguf.py's `permute`); rows are whole, so the inverse permutation of (q, d, m)
rows restores HF's order exactly. Llama-architecture GGUFs only (what the loader converts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

BLOCK_BYTES = 20
GROUP = 32
_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(gguf_name: str) -> str | None:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight (None: not a projection)."""
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _NAMES or parts[3] != "weight":
        return None
    return f"model.layers.{parts[1]}.{_NAMES[parts[2]]}.weight"


def unpack_q4_1(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 [out, groups * 20] -> q uint8 [out, groups * 32], d and m fp32 [out, groups]."""
    out = raw.shape[0]
    blocks = raw.reshape(out, -1, BLOCK_BYTES)  # [out, groups, 20]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]  # [out, groups, 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [out, groups, 32]
    return (torch.from_numpy(q.reshape(out, -1)), torch.from_numpy(d), torch.from_numpy(m))


def unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Indices that turn llama.cpp's permuted rows back into HF's order."""
    idx = torch.arange(n_rows)
    permuted = idx.reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(n_rows)
    return torch.argsort(permuted)


def read_q4_1(gguf: Path, n_head: int, n_kv_head: int
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """HF weight name -> (q, d, m) for every Q4_1 projection in the file."""
    import gguf as gguf_py  # transformers' own GGUF dependency

    found = {}
    for t in gguf_py.GGUFReader(str(gguf)).tensors:
        name = hf_name(t.name)
        if name is None or t.tensor_type.name != "Q4_1":
            continue
        q, d, m = unpack_q4_1(np.asarray(t.data))
        heads = {"q_proj": n_head, "k_proj": n_kv_head}.get(name.split(".")[-2])
        if heads is not None:
            order = unpermute_rows(q.shape[0], heads)
            q, d, m = q[order], d[order], m[order]
        found[name] = (q, d, m)
    return found
