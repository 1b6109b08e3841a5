"""The slot KV cache: one tensor holds every resident sequence's keys and values.

    kv: [L, 2, S, H, T, D]     L layers, 2 = (key, value), S slots, H kv heads, T tokens, D head dim

    slot 0  |k0 k1 k2 k3 k4 . . .|   tokens [0, kv_len) of the sequence in slot 0
    slot 1  |k0 k1 . . . . . . . |
    slot 2  |k0 k1 k2 k3 k4 k5 k6|
             <-------- T -------->

The engine keeps its decoding sequences in the dense range of slots [0, n), so a batched decode
step reads layer l's keys as the view `kv[l, 0, :n, :, :t]`: no gather, no concatenation, no
per-step copy. Positions past a row's own length hold stale data and are masked out.

S and T start small (1 slot x 256 tokens) and double on demand up to (max_slots, max_len): one
whole-cache copy per doubling (amortised), never per step. Growing T costs S x T x 45 KB for
SmolLM2 in fp32, so a lone long prompt must not pay for idle slots: starting at 4 slots made a
cold 2.9k-token prompt zero 0.75 GB (~0.3-1 s) instead of 0.19 GB. Preallocating
max_slots x max_model_len up front would cost 32 x 8192 x 45 KB = 12 GB for SmolLM2 in fp32.

A sequence's tokens [a, b) read as `kv[:, :, slot, :, a:b]`, which is already the KV block layout
[L, 2, H, t, D] of engine/kv_layout.py, so export and import are single copies.
"""

from __future__ import annotations

import logging

import torch

from engine.kv_layout import KVLayout

log = logging.getLogger(__name__)

_MIN_LEN = 256  # tokens; the first allocation covers short chats without a regrowth


class SlotKVCache:
    """Owns the KV tensor. Not thread-safe: only the engine's thread touches it."""

    def __init__(
        self,
        layout: KVLayout,
        max_slots: int,
        max_len: int,
        device: torch.device,
        init_slots: int = 1,
    ):
        self.layout = layout
        self.max_slots = max_slots
        # Round up to whole blocks so an imported last block always fits.
        b = layout.block_size
        self.max_len = -(-max_len // b) * b
        self.device = device
        self._init_shape = (min(init_slots, max_slots), min(_MIN_LEN, self.max_len))
        self.kv = self._alloc(*self._init_shape)

    def _alloc(self, slots: int, length: int) -> torch.Tensor:
        lay = self.layout
        shape = (lay.num_layers, 2, slots, lay.num_kv_heads, length, lay.head_dim)
        # zeros, not empty: masked stale positions are multiplied by 0 in attention, and
        # 0 * NaN from uninitialised memory would poison a whole row.
        return torch.zeros(shape, dtype=lay.dtype, device=self.device)

    @property
    def num_slots(self) -> int:
        return self.kv.shape[2]

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def reserve(self, slots: int = 0, length: int = 0) -> None:
        """Grow (never shrink) so slot indices < `slots` and token positions < `length` exist."""
        assert slots <= self.max_slots and length <= self.max_len, (slots, length)
        if slots <= self.num_slots and length <= self.capacity:
            return
        new_s = self.num_slots
        while new_s < slots:
            new_s = min(self.max_slots, 2 * new_s)
        new_t = self.capacity
        while new_t < length:
            new_t = min(self.max_len, 2 * new_t)
        bigger = self._alloc(new_s, new_t)
        bigger[:, :, : self.num_slots, :, : self.capacity] = self.kv
        log.debug("kv cache grown to %d slots x %d tokens", new_s, new_t)
        self.kv = bigger

    def reset(self, keep: int = 0) -> None:
        """Back to the initial slot count, keeping the token capacity and tokens [0, keep) of
        slot 0 (the retained sequence). Called when idle: growth doubles every slot's capacity,
        so a cache left at 32 slots by a burst would make the next 3k-token prompt zero and
        copy 6 GB (measured ~20 s on CPU) instead of 0.19 GB; keeping the capacity (at most
        max_len x 45 KB) spares back-to-back long prompts the zero-fill."""
        if self.num_slots > self._init_shape[0]:
            kv = self._alloc(self._init_shape[0], self.capacity)
            kv[:, :, 0, :, :keep] = self.kv[:, :, 0, :, :keep]
            self.kv = kv

    def read(self, slot: int, start: int, end: int) -> torch.Tensor:
        """A view of tokens [start, end) of a slot: [L, 2, H, end - start, D]."""
        return self.kv[:, :, slot, :, start:end]

    def write(self, slot: int, start: int, kv: torch.Tensor) -> None:
        """Write `kv` [L, 2, H, t, D] at tokens [start, start + t) of a slot."""
        t = kv.shape[3]
        self.reserve(length=start + t)
        self.kv[:, :, slot, :, start : start + t] = kv

    def write_blocks(self, slot: int, blocks: torch.Tensor | list[torch.Tensor]) -> None:
        """Write n blocks ([n, L, 2, H, B, D], or a list of [L, 2, H, B, D]) at tokens
        [0, n * B) of a slot: one copy per block, never an intermediate concatenation."""
        B = self.layout.block_size
        self.reserve(length=len(blocks) * B)
        for i, block in enumerate(blocks):
            self.kv[:, :, slot, :, i * B : (i + 1) * B] = block

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy tokens [0, length) of slot src into slot dst (one sequence, not the cache)."""
        self.kv[:, :, dst, :, :length] = self.kv[:, :, src, :, :length]

    def swap(self, a: int, len_a: int, b: int, len_b: int) -> None:
        tmp = self.kv[:, :, a, :, :len_a].clone()
        self.move(b, a, len_b)
        self.kv[:, :, b, :, :len_a] = tmp


def flat_to_blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """[L, 2, H, n * B, D] -> a new contiguous [n, L, 2, H, B, D] (always a copy: never an
    alias of the live cache, even where the permuted view happens to be contiguous)."""
    L, two, H, T, D = flat.shape
    n = T // block_size
    blocks = flat.reshape(L, two, H, n, block_size, D)
    return blocks.permute(3, 0, 1, 2, 4, 5).clone(memory_format=torch.contiguous_format)


def blocks_to_flat(blocks: torch.Tensor) -> torch.Tensor:
    """[n, L, 2, H, B, D] -> a new contiguous [L, 2, H, n * B, D]."""
    n, L, two, H, B, D = blocks.shape
    return blocks.permute(1, 2, 3, 0, 4, 5).reshape(L, two, H, n * B, D)
