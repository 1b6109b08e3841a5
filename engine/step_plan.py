"""What one model forward computes: decode rows and prompt chunks, side by side in one row.

A step's tokens go through the model as one flat sequence [1, T]:

    flat:  | d0 d1 ... d(n-1) | chunk 0 tokens | chunk 1 tokens | ...
             decode rows:       prompt chunks: tokens [start, start + t) of one slot each
             slots [0, n), one
             token each

so every Linear runs one GEMM over all T tokens. At serving sizes a forward streams all of the
weights whatever T is: measured on 2 cores in bf16 (docs/BENCHMARKS.md), a 32-token prefill
forward and a 16-row decode forward both take ~56 ms, and a marginal token ~1 ms. A prompt that
rides along with the decode rows therefore costs its tokens, not a forward of its own. Only
attention tells the groups apart: `attend` runs the model's own attention function (sdpa or
eager) once per group, over that group's keys in the slot cache, with the same shapes and masks
as a forward of the group alone (engine/attention.py registers it with transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class Chunk:
    """Prompt tokens [start, start + len(token_ids)) of the sequence in `slot`."""

    slot: int
    start: int
    token_ids: list[int]
    keep: int = 0  # logits kept for its last `keep` positions: 0, 1 (next token), or all


def chunk_mask(start: int, t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, t, start + t] additive mask: query i (position start + i) sees keys <= start + i."""
    q_pos = torch.arange(start, start + t, device=device)[:, None]
    k_pos = torch.arange(start + t, device=device)[None, :]
    mask = torch.zeros(t, start + t, dtype=dtype, device=device)
    mask.masked_fill_(k_pos > q_pos, torch.finfo(dtype).min)
    return mask[None, None]


def decode_mask(positions: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, 1, 1, kv_len] additive mask: row i sees keys at positions <= positions[i]."""
    k_pos = torch.arange(kv_len, device=positions.device)[None, :]
    mask = torch.zeros(positions.shape[0], kv_len, dtype=dtype, device=positions.device)
    mask.masked_fill_(k_pos > positions[:, None], torch.finfo(dtype).min)
    return mask[:, None, None, :]


@dataclass(slots=True)
class StepPlan:
    """One forward's layout, built once and read by every layer (StepCache.update, attend)."""

    n: int = 0  # decode rows: the first n flat tokens, slots [0, n)
    positions: torch.Tensor | None = None  # [n] each row's write position
    rows: torch.Tensor | None = None  # [n] arange: the rows' slots
    kv_len: int = 0  # keys per decode row: max(positions) + 1
    decode_mask: torch.Tensor | None = None  # [n, 1, 1, kv_len]; None for one row
    chunks: list[Chunk] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # each chunk's first flat index
    masks: list[torch.Tensor | None] = field(default_factory=list)  # per chunk; None from 0
    written: int = -1  # the layer StepCache.update last wrote (attend checks it was this one)

    @classmethod
    def build(cls, positions: list[int], chunks: list[Chunk], dtype: torch.dtype,
              device: torch.device) -> StepPlan:
        n = len(positions)
        plan = cls(n=n, chunks=chunks)
        if n:
            plan.positions = torch.tensor(positions, device=device)
            plan.rows = torch.arange(n, device=device)
            plan.kv_len = max(positions) + 1
            # One row attending to all of its keys needs no mask: the same SDPA call as HF's
            # batch-1 decode, so batch-1 output matches generate() bit for bit.
            if n > 1:
                plan.decode_mask = decode_mask(plan.positions, plan.kv_len, dtype)
        off = n
        for c in chunks:
            plan.offsets.append(off)
            off += len(c.token_ids)
            # From position 0 no mask: SDPA's causal kernel (is_causal), ~2x faster on CPU than
            # the same attention under an explicit mask.
            plan.masks.append(None if c.start == 0 else
                              chunk_mask(c.start, len(c.token_ids), dtype, device))
        return plan

    @property
    def max_len(self) -> int:
        """Token positions the slot cache must hold for this forward."""
        ends = [c.start + len(c.token_ids) for c in self.chunks]
        return max([self.kv_len, *ends])

    def flat_inputs(self, decode_ids: list[int], positions: list[int]
                    ) -> tuple[list[int], list[int]]:
        """(token ids, positions) of the flat row, decode rows first."""
        ids, pos = list(decode_ids), list(positions)
        for c in self.chunks:
            ids += c.token_ids
            pos += range(c.start, c.start + len(c.token_ids))
        return ids, pos

    def kept_rows(self) -> int | list[int]:
        """`logits_to_keep`: every decode row, then each chunk's last `keep` positions. An int
        (the last k flat positions; 0 = all) where that says the same, else the indices. With
        no row to keep, 1 (a row nobody reads: transformers has no "none")."""
        rows = list(range(self.n))
        for c, off in zip(self.chunks, self.offsets, strict=True):
            end = off + len(c.token_ids)
            rows += range(end - c.keep, end)
        total = self.offsets[-1] + len(self.chunks[-1].token_ids) if self.chunks else self.n
        if not rows:  # a prompt chunk mid-prefill: no row samples; 0 would mean "all of them"
            return 1
        if rows == list(range(total - len(rows), total)):
            return 0 if len(rows) == total else len(rows)
        return rows

    def write(self, k_buf: torch.Tensor, v_buf: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> None:
        """Store the step's new K/V [1, H, T, D] into one layer's slot buffers [S, H, cap, D]."""
        if self.n:
            # Two advanced indices around a slice select [n, H, D]: row i's token at
            # positions[i] of slot i.
            k_buf[self.rows, :, self.positions] = key[0, :, : self.n].transpose(0, 1)
            v_buf[self.rows, :, self.positions] = value[0, :, : self.n].transpose(0, 1)
        for c, off in zip(self.chunks, self.offsets, strict=True):
            t = len(c.token_ids)
            k_buf[c.slot, :, c.start : c.start + t] = key[0, :, off : off + t]
            v_buf[c.slot, :, c.start : c.start + t] = value[0, :, off : off + t]

    def attend(self, base, module, query: torch.Tensor, k_buf: torch.Tensor,
               v_buf: torch.Tensor, **kwargs) -> torch.Tensor:
        """Attention output [1, T, Hq, D] for queries [1, Hq, T, D], one `base` call per group."""
        outs = []
        if self.n:
            q = query[0, :, : self.n].transpose(0, 1).unsqueeze(2)  # [n, Hq, 1, D]
            k, v = k_buf[: self.n, :, : self.kv_len], v_buf[: self.n, :, : self.kv_len]
            out, _ = base(module, q, k, v, self.decode_mask, **kwargs)  # [n, 1, Hq, D]
            outs.append(out.transpose(0, 1))
        for c, off, mask in zip(self.chunks, self.offsets, self.masks, strict=True):
            t = len(c.token_ids)
            end = c.start + t
            k, v = k_buf[c.slot : c.slot + 1, :, :end], v_buf[c.slot : c.slot + 1, :, :end]
            out, _ = base(module, query[:, :, off : off + t], k, v, mask, **kwargs)  # [1, t, Hq, D]
            outs.append(out)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
