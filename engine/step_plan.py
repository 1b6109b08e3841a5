"""What one model forward computes: decode rows and prompt chunks, side by side in one row.

A step's tokens go through the model as one flat sequence [1, T]:

    flat:  | d0 d1 ... d(n-1) | chunk 0 tokens | chunk 1 tokens | ...
             decode rows:       prompt chunks: tokens [start, start + t) of one sequence each
             one token each,
             longest first

so every Linear runs one GEMM over all T tokens. At serving sizes a forward streams all of the
weights whatever T is: measured on 2 cores in bf16 (docs/BENCHMARKS.md), a 32-token prefill
forward and a 16-row decode forward both take ~56 ms, and a marginal token ~1 ms. A prompt that
rides along with the decode rows therefore costs its tokens, not a forward of its own. Only
attention tells the groups apart: `attend` runs attention once per group, over that group's
keys gathered from its page tables (engine/paged_kv.py), with the same shapes and masks as a
forward of the group alone (engine/attention.py registers it with transformers).

Decode rows are grouped by length so that no row attends over much more than its own keys:

    rows (longest first)  2900 2890 | 400 390 380 | 12
    groups                [  0, 2 ) | [ 2, 5 )    | [5, 6)    one attention call each

A row joins a group while the group's longest row exceeds it by at most
max(GROUP_SPARE, a quarter of the longest): an extra group costs one more attention call per
layer (~20 us on CPU, ~0.6 ms a step over 30 layers), about what 256 padded keys of one row cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine.cold_stream import ColdStream, attend_with_cold
from engine.kv_quant import dequantize, quantize
from engine.page_pool import NULL_PAGE
from engine.split_attention import attend_part

GROUP_SPARE = 256  # keys a decode row may attend beyond its own length (see the docstring)


@dataclass(slots=True)
class Chunk:
    """Prompt tokens [start, start + len(token_ids)) of the sequence whose table is `pages`."""

    pages: list[int]
    start: int
    token_ids: list[int]
    keep: int = 0  # logits kept for its last `keep` positions: 0, 1 (next token), or all
    # A sequence with a cold span (engine/cold_kv.py): `start` is a table position, the
    # tokens' own positions are `shift` later, and `cold` are the span's segment keys.
    shift: int = 0
    cold: list[str] | None = None


@dataclass(slots=True)
class Keys:
    """Where a group's keys are: `rows` page tables of `pages` pages each (row-major, padded
    with the null page), read `width` keys per row. A lone table of consecutive pages is read
    in place (`first`, its first page id); any other is gathered by `table`."""

    rows: int
    pages: int
    width: int
    table: torch.Tensor | None  # [rows * pages] page ids; None when `first` is set
    first: int | None = None

    @classmethod
    def of(cls, tables: list[list[int]], pages: int, width: int, device: torch.device) -> Keys:
        if len(tables) == 1:
            t = tables[0][:pages]
            if t == list(range(t[0], t[0] + pages)):
                return cls(1, pages, width, None, t[0])
        return cls(len(tables), pages, width, page_table(tables, pages, device))

    def read(self, kv: torch.Tensor, workspace: Workspace | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [rows, H, width, D] from one layer's pool kv [2, N, P, H, D]."""
        _, _, P, H, D = kv.shape
        if self.first is not None:  # in place: token-major pages, so keys have stride H x D
            k, v = kv[0], kv[1]
            offset = self.first * P * H * D
        else:  # two index_selects over dim 0: one over dim 1 of kv measured ~1.3x slower
            outs = (None, None) if workspace is None else workspace.buffers(kv, len(self.table))
            k, v = (torch.index_select(kv[i], 0, self.table, out=outs[i]) for i in (0, 1))
            offset = 0
        # [rows, H, width, D] straight from the [pages, P, H, D] layout: one as_strided each
        # (a chain of view/slice/transpose cost ~3x as much per layer, measured)
        size, stride = (self.rows, H, self.width, D), (self.pages * P * H * D, D, H * D, 1)
        return (k.as_strided(size, stride, k.storage_offset() + offset),
                v.as_strided(size, stride, v.storage_offset() + offset))


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows [lo, hi) of the flat row, attending over keys.width keys each."""

    lo: int
    hi: int
    keys: Keys  # width: the exact length for a lone row, else whole pages
    mask: torch.Tensor | None  # [hi - lo, 1, 1, width] additive; None for a lone row
    cold: list[str] | None = None  # a lone row's cold segment keys (engine/cold_kv.py)


def chunk_mask(start: int, t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, t, start + t] additive mask: query i (position start + i) sees keys <= start + i."""
    q_pos = torch.arange(start, start + t, device=device)[:, None]
    k_pos = torch.arange(start + t, device=device)[None, :]
    mask = torch.zeros(t, start + t, dtype=dtype, device=device)
    mask.masked_fill_(k_pos > q_pos, torch.finfo(dtype).min)
    return mask[None, None]


def decode_mask(lengths: list[int], width: int, dtype: torch.dtype, device: torch.device
                ) -> torch.Tensor:
    """[n, 1, 1, width] additive mask: row i sees its first lengths[i] keys."""
    k_pos = torch.arange(width, device=device)[None, :]
    lens = torch.tensor(lengths, device=device)[:, None]
    mask = torch.zeros(len(lengths), width, dtype=dtype, device=device)
    mask.masked_fill_(k_pos >= lens, torch.finfo(dtype).min)
    return mask[:, None, None, :]


def group_rows(lengths: list[int], alone: list[bool] | None = None) -> list[tuple[int, int]]:
    """[lo, hi) ranges of rows (lengths descending) that share one attention call; a row
    marked `alone` (one with a cold span) gets a call of its own."""
    alone = alone or [False] * len(lengths)
    groups, lo = [], 0
    for i in range(1, len(lengths) + 1):
        if (i == len(lengths) or alone[i] or alone[lo]
                or lengths[lo] - lengths[i] > max(GROUP_SPARE, lengths[lo] // 4)):
            groups.append((lo, i))
            lo = i
    return groups


def page_table(tables: list[list[int]], pages: int, device: torch.device) -> torch.Tensor:
    """[len(tables) * pages] the tables' first `pages` ids, each padded with the null page."""
    ids = [t[i] if i < len(t) else NULL_PAGE for t in tables for i in range(pages)]
    return torch.tensor(ids, dtype=torch.long, device=device)


class Workspace:
    """Two page buffers the gathers of every layer and group write into in turn, grown on
    demand and kept. A fresh tensor per gather costs more than the copy: measured on the 2-vCPU
    box, fp32, 16 rows x 512 keys, gather + attention took 6.1 ms per layer with a new tensor
    each time (glibc returns big blocks to the kernel, so each one page-faults anew) and 1.3 ms
    without (docs/BENCHMARKS.md, "The cost of paging")."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def buffers(self, kv: torch.Tensor, pages: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous [pages, P, H, D] views for K and V, for a pool kv [2, N, P, H, D]."""
        if self.k is None or self.k.shape[0] < pages or self.k.dtype != kv.dtype:
            shape = (max(pages, 2 * (0 if self.k is None else self.k.shape[0])), *kv.shape[2:])
            self.k = torch.empty(shape, dtype=kv.dtype, device=kv.device)
            self.v = torch.empty_like(self.k)
        return self.k[:pages], self.v[:pages]


@dataclass(slots=True)
class StepPlan:
    """One forward's layout, built once and read by every layer (StepCache.update, attend)."""

    n: int = 0  # decode rows: the first n flat tokens
    slots: torch.Tensor | None = None  # [T] where each flat token's K/V goes in the pool
    groups: list[DecodeGroup] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # each chunk's first flat index
    masks: list[torch.Tensor | None] = field(default_factory=list)  # per chunk; None from 0
    keys: list[Keys | None] = field(default_factory=list)  # per chunk; None from 0
    # The layer StepCache.update last wrote (attend checks it is this one) and its pool.
    written: int = -1
    kv: torch.Tensor | None = None  # [2, N, P, H, D]
    workspace: Workspace | None = None  # gathers land here (None: fresh tensors)
    stream: ColdStream | None = None  # the step's cold segments, when a row or chunk has any
    quant: str | None = None  # the pool's rows are quantized so (engine/kv_quant.py)
    rotation: torch.Tensor | None = None  # [D, D]: quantized rows are stored rotated by it

    @classmethod
    def build(cls, rows: list[tuple[list[int], int]], chunks: list[Chunk], page_size: int,
              dtype: torch.dtype, device: torch.device,
              colds: list[list[str] | None] | None = None) -> StepPlan:
        """rows: (page table, write position in it) of each decode row, longest first; colds:
        each row's cold segment keys, or None (engine/cold_kv.py)."""
        P = page_size
        colds = colds or [None] * len(rows)
        plan = cls(n=len(rows), chunks=chunks)
        slots = [pages[pos // P] * P + pos % P for pages, pos in rows]
        lengths = [pos + 1 for _, pos in rows]
        for lo, hi in group_rows(lengths, [c is not None for c in colds]):
            group = _decode_group(rows[lo:hi], lengths[lo:hi], lo, P, dtype, device)
            group.cold = colds[lo]
            plan.groups.append(group)
        off = plan.n
        for c in chunks:
            t = len(c.token_ids)
            plan.offsets.append(off)
            off += t
            slots += [c.pages[p // P] * P + p % P for p in range(c.start, c.start + t)]
            # From position 0 the chunk's own K/V are all its keys: no gather, and no mask, so
            # SDPA's causal kernel (is_causal), ~2x faster on CPU than under an explicit mask.
            first = c.start == 0
            plan.masks.append(None if first else chunk_mask(c.start, t, dtype, device))
            end_page = -(-(c.start + t) // P)
            plan.keys.append(None if first else Keys.of([c.pages], end_page, c.start + t, device))
        plan.slots = torch.tensor(slots, dtype=torch.long, device=device)
        return plan

    def flat_inputs(self, decode_ids: list[int], positions: list[int]
                    ) -> tuple[list[int], list[int]]:
        """(token ids, positions) of the flat row, decode rows first."""
        ids, pos = list(decode_ids), list(positions)
        for c in self.chunks:
            ids += c.token_ids
            pos += range(c.start + c.shift, c.start + c.shift + len(c.token_ids))
        return ids, pos

    def cold_items(self) -> list[list[str]]:
        """The cold segment keys of each row and chunk that has a span, in attention's order."""
        return ([g.cold for g in self.groups if g.cold is not None]
                + [c.cold for c in self.chunks if c.cold is not None])

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

    def write(self, kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the step's new K/V [1, H, T, D] into one layer's pool kv [2, N, P, H, W]
        (W = D, or a quantized row's width: rotated, then quantized, engine/kv_quant.py)."""
        flat = kv.view(2, -1, *kv.shape[3:])  # [2, N * P, H, W]
        for i, x in enumerate((key, value)):
            rows = x[0].transpose(0, 1)  # [T, H, D]
            if self.quant is not None:
                rows = quantize(self._rotate(rows), self.quant)
            flat[i].index_copy_(0, self.slots, rows)
        self.kv = kv

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] by the quantized pool's rotation R (symmetric: R is its own inverse)."""
        return x if self.rotation is None else x @ self.rotation

    def _read(self, keys: Keys, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """keys.read, dequantized to `dtype` when the pool is quantized (still rotated)."""
        k, v = keys.read(self.kv, self.workspace)
        if self.quant is None:
            return k, v
        return dequantize(k, self.quant, dtype), dequantize(v, self.quant, dtype)

    def attend(self, base, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               **kwargs) -> torch.Tensor:
        """Attention output [1, T, Hq, D] for queries [1, Hq, T, D], one call per group; key
        and value [1, H, T, D] are the step's own (a chunk from position 0 attends to them).
        Over a rotated pool the queries are rotated and each output rotated back."""
        pooled = self._rotate(query)  # what attends over keys read from the pool
        if self.n == 1 and not self.chunks and self.stream is None:  # [1, Hq, 1, D] as is
            k, v = self._read(self.groups[0].keys, query.dtype)
            out = decode_attention(base, module, pooled, k, v, None, kwargs)  # [1, 1, Hq, D]
            return self._rotate(out)
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        outs = []
        for g in self.groups:
            q = pooled[0, :, g.lo : g.hi].transpose(0, 1).unsqueeze(2)  # [g, Hq, 1, D]
            k, v = self._read(g.keys, query.dtype)  # [g, H, width, D] each
            if g.cold is not None:  # a lone row: [1, 1, Hq, D]
                out = attend_with_cold(self.stream, g.cold, q, [attend_part(q, k, v, scale)],
                                       scale)
            else:
                out = decode_attention(base, module, q, k, v, g.mask, kwargs).transpose(0, 1)
            outs.append(self._rotate(out))
        for c, off, mask, keys in zip(self.chunks, self.offsets, self.masks, self.keys,
                                      strict=True):
            t = len(c.token_ids)
            if keys is None:  # its own fresh keys, exact and unrotated
                out, _ = base(module, query[:, :, off : off + t], key[:, :, off : off + t],
                              value[:, :, off : off + t], mask, **kwargs)  # [1, t, Hq, D]
                outs.append(out)
                continue
            q = pooled[:, :, off : off + t]  # [1, Hq, t, D]
            k, v = self._read(keys, query.dtype)  # [1, H, start + t, D] each
            if c.cold is not None:  # earlier keys, then its own (causal): no mask either way
                s = c.start
                here = [attend_part(q, k[:, :, :s], v[:, :, :s], scale),
                        attend_part(q, k[:, :, s:], v[:, :, s:], scale, causal=True)]
                out = attend_with_cold(self.stream, c.cold, q, here, scale)
            else:
                out = chunk_attention(base, module, q, k, v, mask, kwargs)  # [1, t, Hq, D]
            outs.append(self._rotate(out))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _decode_group(rows: list[tuple[list[int], int]], lengths: list[int], lo: int, P: int,
                  dtype: torch.dtype, device: torch.device) -> DecodeGroup:
    pages = -(-lengths[0] // P)
    tables = [r[0] for r in rows]
    if len(rows) == 1:  # exact length, no mask (fp32: the same SDPA call as generate())
        return DecodeGroup(lo, lo + 1, Keys.of(tables, pages, lengths[0], device), None)
    return DecodeGroup(lo, lo + len(rows), Keys.of(tables, pages, pages * P, device),
                       decode_mask(lengths, pages * P, dtype, device))


def decode_attention(base, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
    """[g, 1, Hq, D] for decode queries q [g, Hq, 1, D] over k, v [g, H, width, D].

    The Hq / H queries that share a key head are packed as that head's query rows,
    [g, H, Hq / H, D], which a mask [g, 1, 1, w] broadcasts over: one attention task per key
    head instead of one per query head, and no copy of K/V per query head (repeat_kv).

    In bf16 that is ~5x faster on a CPU without AMX: torch's CPU flash kernel re-packs the keys
    for each (row, head) task, so one query row per task costs ~0.55 us per key per layer (9
    query heads, 340 keys: 194 us; packed 3 x 3: 39 us; 3,000 keys: 1.65 ms vs 0.28 ms; AMD
    EPYC avx512_bf16, docs/BENCHMARKS.md "Decode attention in bf16"). The packed rows are not
    bit-identical to transformers' own call (a row's dot products go through a 3-row kernel),
    so bf16 keeps vLLM's top-5 rule at batch 1 as it already does batched. In fp32 the packing
    buys nothing (28 vs 31 us) and is not bit-identical either, so a lone fp32 row keeps
    transformers' own call, the one generate() makes: fp32 greedy stays equal to generate().
    """
    if base is not sdpa_attention_forward or (mask is None and q.dtype == torch.float32):
        out, _ = base(module, q, k, v, mask, **kwargs)
        return out
    g, Hq, _, D = q.shape
    return _packed_sdpa(q, k, v, mask, kwargs.get("scaling")).reshape(g, 1, Hq, D)


def chunk_attention(base, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """[1, t, Hq, D] for a chunk's queries q [1, Hq, t, D] over the keys before and of it,
    k, v [1, H, W, D], under mask [1, 1, t, W]: packed like decode_attention, the Hq / H query
    heads that share a key head as that head's rows [1, H, Hq / H * t, D], the mask repeated
    for each. transformers' own call copies K/V per query head instead (repeat_kv: for a
    24-token continuation over 2,864 cached tokens in fp32, 2 x 6.6 MB per layer). Only chunks
    that continue over earlier keys come here, forwards generate() never makes (it prefills a
    prompt whole), so no exact twin is lost; a whole prompt from position 0 attends over its
    own keys through transformers' call (StepPlan.attend)."""
    if base is not sdpa_attention_forward:
        out, _ = base(module, q, k, v, mask, **kwargs)
        return out
    return _packed_sdpa(q, k, v, mask, kwargs.get("scaling")).transpose(1, 2)


def _packed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 scale: float | None) -> torch.Tensor:
    """[g, Hq, t, D] for queries q [g, Hq, t, D] over k, v [g, H, W, D] under an additive
    mask [g, 1, t, W] (or None): one SDPA over [g, H, Hq / H * t, D], the query heads of a key
    head stacked as its rows and the mask repeated for each (broadcast when t is 1)."""
    g, Hq, t, D = q.shape
    r = Hq // k.shape[1]
    if mask is not None and t > 1:
        mask = mask.repeat(1, 1, r, 1)
    out = F.scaled_dot_product_attention(q.reshape(g, k.shape[1], r * t, D), k, v,
                                         attn_mask=mask, scale=scale)  # [g, H, r * t, D]
    return out.reshape(g, Hq, t, D)
