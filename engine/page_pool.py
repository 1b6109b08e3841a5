"""The KV page pool: every resident sequence's keys and values, in fixed-size pages, under one
memory budget.

    kv: [L, 2, N, P, H, D]     L layers, 2 = (key, value), N pages of P tokens,
                               H kv heads, D head dim

Token-major inside a page ([P, H, D], not [H, P, D]): gathering a row's pages,
`kv[l, 0].index_select(0, ids)` -> [n, P, H, D], reads as keys [H, n * P, D] through a transpose
(a view, no second copy), and one step's new K/V [T, H, D] go in with one index_copy_ over the
pool viewed as [N * P, H, D].

A page is in one of four states:

    referenced   ref > 0: in some sequence's page table (several, when shared)
    free, plain  ref 0, content meaningless
    free, cached ref 0, a full page findable by its chained digest (engine/page_hash.py): the
                 device prefix cache. Evicted least recently freed first, only when no plain or
                 fresh page is left.
    fresh        never handed out yet

The tensor is allocated with torch.empty and a page is zeroed when first handed out, so a CPU
pool costs resident memory only as far as it has been used. Zeroing matters: attention masks
stale positions to weight 0, and 0 * NaN from uninitialised memory would poison the whole row.
Page 0 is the null page: zeros, never handed out, it pads gathers.

`prefault` pages are zeroed up front instead, at construction: the first touch of fresh memory
is the slow part of handing out a page on a CPU (a VM faults it in at ~1 ms per MB, several
times that while another process holds most of the host's memory; docs/BENCHMARKS.md, "Store
block size and the after-restart TTFT"), and the first prompt after a restart, whose prefix is
imported from the store, should not pay it on its TTFT.
"""

from __future__ import annotations

import torch

from engine.kv_layout import KVLayout
from engine.resident_filter import ResidentFilter

NULL_PAGE = 0


class PagePool:
    """Owns the page tensor and each page's refcount and digest. Not thread-safe (the engine's
    thread only), except `lookup`, a lock-free read another thread may do (see there)."""

    def __init__(self, layout: KVLayout, num_pages: int, page_size: int, device: torch.device,
                 prefault: int = 0):
        assert num_pages >= 2, num_pages
        self.layout = layout
        self.page_size = page_size
        shape = (layout.num_layers, 2, num_pages, page_size, layout.num_kv_heads,
                 layout.row)
        self.kv = torch.empty(shape, dtype=layout.store_dtype, device=device)
        # Pages [0, _zeroed) are zero until handed out: the null page and the prefaulted ones.
        self._zeroed = min(1 + max(prefault, 0), num_pages)
        self.kv[:, :, : self._zeroed].zero_()
        self.ref = [0] * num_pages
        self.digest: list[bytes | None] = [None] * num_pages
        # Free pages by kind; dicts keep insertion order, so the first key is the oldest free.
        self._plain: dict[int, None] = {}
        self._cached: dict[int, None] = {}
        self._by_digest: dict[bytes, int] = {}  # every registered page, referenced or free
        self._fresh = 1  # pages [_fresh, N) were never handed out
        self.evictions = 0  # cached pages reused for other content
        self.resident = ResidentFilter(num_pages)  # the registered digests, for routers

    @staticmethod
    def page_bytes(layout: KVLayout, page_size: int) -> int:
        return layout.token_bytes * page_size

    @property
    def num_pages(self) -> int:
        """Pages sequences can hold (the null page excluded)."""
        return len(self.ref) - 1

    @property
    def num_free(self) -> int:
        """Pages allocate() can hand out now, cached ones included (it evicts them)."""
        return len(self._plain) + len(self._cached) + len(self.ref) - self._fresh

    @property
    def num_referenced(self) -> int:
        """Pages in some sequence's table."""
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Free pages still holding findable KV."""
        return len(self._cached)

    def allocate(self, after: int | None = None) -> int:
        """A page with ref 1: page `after + 1` if it is plain or the next fresh one (a table of
        consecutive pages is read in place, without a gather: engine/step_plan.py), else a
        plain free one, else a fresh one, else the oldest cached one (strict LRU: a cached page
        is never taken out of turn for adjacency)."""
        want = None if after is None else after + 1
        want_fresh = want == self._fresh < len(self.ref)
        if want in self._plain:
            page = want
            del self._plain[page]
        elif self._plain and not want_fresh:
            page = next(iter(self._plain))
            del self._plain[page]
        elif self._fresh < len(self.ref):
            page, self._fresh = self._fresh, self._fresh + 1
            if page >= self._zeroed:
                self.kv[:, :, page].zero_()
        elif self._cached:
            page = next(iter(self._cached))
            del self._cached[page], self._by_digest[self.digest[page]]
            self.resident.remove(self.digest[page])
            self.digest[page] = None
            self.evictions += 1
        else:
            raise MemoryError("KV page pool exhausted (the engine checks num_free first)")
        self.ref[page] = 1
        return page

    def share(self, page: int) -> None:
        """One more reference to `page` (a prefix hit, or a fork's copy of a page table)."""
        if self.ref[page] == 0:
            self._cached.pop(page, None)
            self._plain.pop(page, None)
        self.ref[page] += 1

    def release(self, pages: list[int]) -> None:
        """Drop one reference to each page. Freed in reverse, so a sequence's last pages (the
        least shareable: only its own continuation matches them) are evicted before its first."""
        for page in reversed(pages):
            self.ref[page] -= 1
            if self.ref[page] == 0:
                (self._cached if self.digest[page] is not None else self._plain)[page] = None

    def register(self, page: int, digest: bytes) -> None:
        """Make a full page findable by its digest, unless another page already holds it."""
        if digest not in self._by_digest and self.digest[page] is None:
            self._by_digest[digest] = page
            self.digest[page] = digest
            self.resident.add(digest)

    def lookup(self, digests: list[bytes]) -> list[int]:
        """The pages holding the longest run of `digests` from the first. Any thread may ask
        (dict reads are atomic under the GIL); the answer may be stale by the time it is used."""
        pages = []
        for d in digests:
            page = self._by_digest.get(d)
            if page is None:
                break
            pages.append(page)
        return pages
