"""Where each sequence's KV lives: its page table over the pool (engine/page_pool.py).

    token_ids   |t0 .. t15|t16 .. t31|t32 t33 t34 . . . |
    seq.pages   [    7    ,    2     ,    9             ]    page i holds tokens [i*P, (i+1)*P)
    kv_len = 35: pages 7 and 2 are full (digested, findable by other sequences); 9 holds 3 of 16

Pages are refcounted and may sit in several tables: a prefix hit shares the full pages of an
earlier sequence, and a fork (n > 1, a branch) shares all of its parent's. A full page is never
written again, so sharing one costs nothing; a partial last page shared by forks is copied by
the first of them to write into it (copy-on-write).
"""

from __future__ import annotations

import torch

from engine.cold_kv import ColdKV, table_len
from engine.page_hash import extend_chain
from engine.page_pool import PagePool
from engine.sequence import Sequence

# A cached prefix of at most this many pages (64 tokens) is copied into pages of the sequence's
# own rather than shared, while that leaves half the pool free. Its table is
# then one run of consecutive pages, which a lone decode row reads in place where a table of two
# runs (a shared first page, its own after) is gathered every layer of every step. Measured
# served at c=1 in bf16 (2-vCPU AMD avx512_bf16 box; chats share their template's first page):
# 2.5% below the dense cache with the page shared, equal with it copied; the copy is 4 pages once.
COPY_PREFIX_PAGES = 4


class PagedKV:
    """Page tables, prefix matching and KV import/export for the engine's sequences. The pages
    themselves live in `pool`; each Sequence carries its own table (`pages`) and digests."""

    def __init__(self, pool: PagePool, root_for, caching: bool = True,
                 cold: ColdKV | None = None):
        self.pool = pool
        self.page_size = pool.page_size
        self._root_for = root_for  # cache_salt -> chain root (engine/page_hash.py)
        self.caching = caching  # False: no page is registered, so none is ever matched
        self.cold = cold  # None: every sequence's KV stays in the pool

    # --- prefix cache -------------------------------------------------------------------------

    def digests(self, seq: Sequence, full_pages: int) -> list[bytes]:
        """The chained digests of seq's first `full_pages` pages (computed once per page)."""
        if seq.root is None:
            seq.root = self._root_for(seq.cache_salt)
        extend_chain(seq.digests, seq.root, seq.token_ids, self.page_size, full_pages)
        return seq.digests[:full_pages]

    def match(self, seq: Sequence) -> int:
        """Take the longest run of cached pages that starts seq's tokens (always leaving one
        token to feed: its logits give the next token). Returns the tokens it covers."""
        assert not seq.pages
        limit = (len(seq.token_ids) - 1) // self.page_size
        pages = self.pool.lookup(self.digests(seq, limit))
        for page in pages:  # referenced first, so allocating the copies cannot evict them
            self.pool.share(page)
        seq.pages = pages
        if len(pages) <= COPY_PREFIX_PAGES and self.pool.num_free - len(pages) >= (
                self.pool.num_pages // 2):
            seq.pages = []
            for page in pages:  # copied, not shared: see COPY_PREFIX_PAGES
                seq.pages.append(self._copy(page, seq.pages[-1] if seq.pages else None))
        return len(pages) * self.page_size

    def commit(self, seq: Sequence) -> None:
        """Make seq's newly filled pages findable by later sequences (not once part of it is
        cold: its table index is then no longer its token page index)."""
        full = seq.kv_len // self.page_size
        if self.caching and seq.committed < full and seq.cold is None:
            digests = self.digests(seq, full)
            for i in range(seq.committed, full):
                self.pool.register(seq.pages[i], digests[i])
            seq.committed = full

    # --- entering the pool ----------------------------------------------------------------

    def place(self, seq: Sequence) -> tuple[int, int] | None:
        """Put a waiting sequence's KV into the pool: its longest cached prefix, then whatever
        of its held import (tokens [held_start, kv_len)) goes beyond that, plus a page for its
        next token if it decodes at once. Returns (tokens from the pool, tokens imported), or
        None, with nothing taken, when the pool lacks the pages."""
        imported = seq.kv_len
        seq.kv_len = 0
        hit = seq.kv_len = self.match(seq) if seq.prompt_lps is None else 0
        # The import must start inside what the pool holds (its pages may be gone since).
        held = imported if hit >= seq.held_start else 0
        end = max(hit, held)
        decoder = end == len(seq.token_ids) - 1
        need = self.pages_needed(seq, end + decoder)
        if self.cold is not None:  # a long import goes through the window, and on cold
            need = min(need, max(0, self.cold.window - len(seq.pages)) + self.must_copy(seq))
        if need > self.pool.num_free:
            self.free(seq)
            seq.kv_len = imported
            return None
        while seq.kv_len < held:
            n = held - seq.kv_len
            if self.cold is not None:
                n = self.cold.fit(seq, n)
            if self.pages_needed(seq, seq.kv_len + n) > self.pool.num_free:
                break  # pages that went cold were shared, so none came free: recompute the rest
            self.grow(seq, seq.kv_len + n)
            self._write_held(seq, seq.kv_len, seq.kv_len + n)
            seq.kv_len += n
        seq.held_blocks = seq.held_flat = None
        seq.held_start = 0
        self.commit(seq)
        return hit, seq.kv_len - hit

    def _write_held(self, seq: Sequence, start: int, end: int) -> None:
        """Copy tokens [start, end) of seq's held import into its pages."""
        parts = list(seq.held_blocks) if seq.held_blocks is not None else []
        if seq.held_flat is not None:
            parts.append(seq.held_flat)
        at = seq.held_start
        for kv in parts:  # each [L, 2, H, t, D] covering tokens [at, at + t)
            t = kv.shape[3]
            lo, hi = max(start, at), min(end, at + t)
            if lo < hi:
                self.write(seq, lo, kv[:, :, :, lo - at : hi - at])
            at += t

    # --- page tables --------------------------------------------------------------------------

    def pages_needed(self, seq: Sequence, end: int) -> int:
        """Pages the pool must hand out for seq to write tokens [kv_len, end)."""
        if end <= seq.kv_len:
            return 0
        new = -(-(end - seq.kv_len + table_len(seq)) // self.page_size) - len(seq.pages)
        return max(0, new) + self.must_copy(seq)

    def must_copy(self, seq: Sequence) -> int:
        """1 if seq's next write lands in a partial page it shares (copy-on-write)."""
        P, t = self.page_size, table_len(seq)
        return int(t % P != 0 and self.pool.ref[seq.pages[t // P]] > 1)

    def grow(self, seq: Sequence, end: int) -> None:
        """Give seq pages of its own for tokens [kv_len, end): pages_needed() must be free."""
        if end <= seq.kv_len:
            return
        if self.must_copy(seq):
            i = table_len(seq) // self.page_size
            seq.pages[i] = self._copy(seq.pages[i], seq.pages[i - 1] if i else None)
        end += table_len(seq) - seq.kv_len  # a table position
        while len(seq.pages) * self.page_size < end:
            seq.pages.append(self.pool.allocate(seq.pages[-1] if seq.pages else None))

    def _copy(self, page: int, after: int | None) -> int:
        """A page of one's own with `page`'s content (next to `after` if it can be), in place of
        the reference held to `page`, which is dropped."""
        new = self.pool.allocate(after)
        self.pool.kv[:, :, new] = self.pool.kv[:, :, page]
        self.pool.release([page])
        return new

    def free(self, seq: Sequence) -> None:
        self.pool.release(seq.pages)
        seq.pages, seq.committed = [], 0
        if seq.cold is not None:
            self.cold.release(seq.cold)
            seq.cold = None

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every page of parent's table (and its cold span)."""
        for page in parent.pages:
            self.pool.share(page)
        child.pages, child.committed = list(parent.pages), parent.committed
        if parent.cold is not None:
            child.cold = self.cold.share(parent.cold)
        child.root, child.digests = parent.root, list(parent.digests)

    # --- token addressing ---------------------------------------------------------------------

    def runs(self, pages: list[int], start: int, t: int) -> list[tuple[int, int, int, int]]:
        """Table positions [start, start + t) of `pages` as (page, offset, at, n): positions
        [start + at, start + at + n) lie from `offset` of `page` on, through consecutive pages.
        A table is mostly one run (engine/page_pool.py allocates next to the last page)."""
        P, out, at = self.page_size, [], 0
        while at < t:
            i, off = divmod(start + at, P)
            k = 1
            while off + t - at > k * P and pages[i + k] == pages[i] + k:
                k += 1
            n = min(k * P - off, t - at)
            out.append((pages[i], off, at, n))
            at += n
        return out

    def span(self, page: int, offset: int, n: int) -> torch.Tensor:
        """[L, 2, n, H, D] view of n tokens from `offset` of `page` on, through the pages next."""
        k = -(-(offset + n) // self.page_size)
        return self.pool.kv[:, :, page:page + k].flatten(2, 3)[:, :, offset:offset + n]

    def write(self, seq: Sequence, start: int, kv: torch.Tensor) -> None:
        """Write kv [L, 2, H, t, D] at tokens [start, start + t) of seq's pages (past its cold
        span, if it has one). One strided copy per run of pages: an index_put over the flat
        pool cost 2-3x as much for an import of 179 pages (bf16, 2 vCPUs: 30 vs 10-14 ms)."""
        start -= seq.kv_len - table_len(seq)
        src = kv.to(self.pool.kv.device).permute(0, 1, 3, 2, 4)  # [L, 2, t, H, D]
        for page, offset, at, n in self.runs(seq.pages, start, src.shape[2]):
            self.span(page, offset, n).copy_(src[:, :, at:at + n])

    def read(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) of seq as a new tensor [L, 2, H, end - start, D]: from its
        pages, and from the cold tier for the part of them in its cold span."""
        span = seq.cold
        if span is None:
            return self._read_pages(seq.pages, start, end)
        lo, hi = span.sink, span.sink + span.tokens  # the span's token positions
        parts = []
        if start < min(end, lo):
            parts.append(self._read_pages(seq.pages, start, min(end, lo)))
        if max(start, lo) < min(end, hi):
            parts.append(self.cold.read(span, max(start, lo), min(end, hi)))
        if max(start, hi) < end:
            shift = span.tokens
            parts.append(self._read_pages(seq.pages, max(start, hi) - shift, end - shift))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)

    def read_blocks(self, seq: Sequence, first: int, count: int, block: int) -> torch.Tensor:
        """Blocks [first, first + count) of `block` tokens of seq as a new tensor
        [count, L, 2, H, block, D], each copied from the pages straight into its place (a flat
        read then a reshape into blocks was two copies: 67 vs 27-30 ms for 179 blocks in bf16)."""
        L, two, _, _, H, D = self.pool.kv.shape
        out = torch.empty((count, L, two, H, block, D), dtype=self.pool.kv.dtype,
                          device=self.pool.kv.device)
        for j in range(count):
            start = (first + j) * block
            if seq.cold is None:
                self._read_pages(seq.pages, start, start + block, out[j])
            else:
                out[j].copy_(self.read(seq, start, start + block))
        return out

    def _read_pages(self, pages: list[int], start: int, end: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """Table positions [start, end) of `pages` as [L, 2, H, end - start, D], into `out`
        (a new tensor if None): one copy per run of pages."""
        if out is None:
            L, two, _, _, H, D = self.pool.kv.shape
            out = torch.empty((L, two, H, end - start, D), dtype=self.pool.kv.dtype,
                              device=self.pool.kv.device)
        for page, offset, at, n in self.runs(pages, start, end - start):
            out[:, :, :, at:at + n].copy_(self.span(page, offset, n).transpose(2, 3))
        return out
