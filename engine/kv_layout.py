"""The KV block: the unit that moves between engine, store and workers.

One block holds `block_size` consecutive tokens of one sequence, for every layer:

    block: [num_layers, 2, num_kv_heads, block_size, row]     (2 = key, value)
    many:  [n_blocks, num_layers, 2, num_kv_heads, block_size, row]

`row` is head_dim for exact KV in the model's dtype, or the byte width of a quantized row
(engine/kv_quant.py: values and their scale), stored as `store_dtype`.

Block i of a sequence covers tokens [i * block_size, (i + 1) * block_size). Only full blocks are
content-addressed in the store; a sequence's partial tail travels as a "tail" tensor of shape
[num_layers, 2, num_kv_heads, t, row] with t < block_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_quant import row_width, storage_dtype

# Tokens per store block: one page (engine/config.py's page_size), 368 KB for SmolLM2 in bf16. A
# prompt reloaded from the store recomputes what its last full block leaves out, up to B - 1
# tokens: at 64 (1.47 MB) that was 72 of a 2,888-token chat after a restart, 0.30 s of a 2-vCPU
# bf16 forward, against 0.10 s for the 24 left at 16 (scripts/bench_reload.py). Smaller blocks
# cost the store ~2x the CPU per byte (scripts/bench_kvstore.py; both in docs/BENCHMARKS.md).
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the model's: what attention computes in
    quant: str | None = None  # "int8" | "uint4": rows stored quantized (engine/kv_quant.py)

    @classmethod
    def from_config(cls, config, block_size: int, dtype: torch.dtype,
                    quant: str | None = None) -> KVLayout:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, block_size, dtype, quant)

    @property
    def row(self) -> int:
        """Elements per stored key or value row."""
        return row_width(self.quant, self.head_dim)

    @property
    def store_dtype(self) -> torch.dtype:
        return storage_dtype(self.quant, self.dtype)

    @property
    def name(self) -> str:
        """The stored format, as store namespaces and page digests name it."""
        return self.quant or str(self.dtype).removeprefix("torch.")

    @property
    def token_bytes(self) -> int:
        """Bytes of KV per token, all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.row * self.store_dtype.itemsize

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, self.block_size, self.row)


def flat_to_blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """[L, 2, H, n * B, D] -> a new contiguous [n, L, 2, H, B, D] (always a copy: never an
    alias of the live pool)."""
    L, two, H, T, D = flat.shape
    n = T // block_size
    blocks = flat.reshape(L, two, H, n, block_size, D)
    return blocks.permute(3, 0, 1, 2, 4, 5).clone(memory_format=torch.contiguous_format)


def blocks_to_flat(blocks: torch.Tensor) -> torch.Tensor:
    """[n, L, 2, H, B, D] -> a new contiguous [L, 2, H, n * B, D]."""
    n, L, two, H, B, D = blocks.shape
    return blocks.permute(1, 2, 3, 0, 4, 5).reshape(L, two, H, n * B, D)
