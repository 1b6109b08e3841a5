"""Chained digests of the engine's KV pages: the device prefix cache's keys.

Same scheme as the store's block keys (kvstore/keys.py), at the engine's page size:

    root    = blake2b(len-prefixed "tandem/page/v1", fingerprint, dtype, page_size, cache_salt)
    page[0] = blake2b(root      || int32le(tokens[0:P]))
    page[i] = blake2b(page[i-1] || int32le(tokens[i*P:(i+1)*P]))

so equal digests mean equal tokens *and everything before them* under one model, dtype and
tenant: a page is shared only where its KV is the same. The engine cannot import kvstore (they
are peer layers), and the store keys B-token blocks; this is the same chain over P-token pages.
Python's `hash()` is salted per process and never used here.
"""

from __future__ import annotations

import hashlib
import sys
from array import array

DIGEST_BYTES = 16  # 128 bits: collisions are negligible across billions of pages


def chain_root(fingerprint: str, dtype: str, page_size: int, cache_salt: str) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for field in ("tandem/page/v1", fingerprint, dtype, str(page_size), cache_salt):
        raw = field.encode("utf-8")
        h.update(len(raw).to_bytes(4, "little"))
        h.update(raw)
    return h.digest()


def extend_chain(digests: list[bytes], root: bytes, token_ids: list[int], page_size: int,
                 upto: int) -> None:
    """Append the digests of pages [len(digests), upto) of `token_ids` to `digests`."""
    P = page_size
    parent = digests[-1] if digests else root
    for i in range(len(digests), upto):
        ids = array("i", token_ids[i * P : (i + 1) * P])  # int32, native byte order
        if sys.byteorder == "big":
            ids.byteswap()
        parent = hashlib.blake2b(parent + ids.tobytes(), digest_size=DIGEST_BYTES).digest()
        digests.append(parent)
