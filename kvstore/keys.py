"""Content-addressed block keys, namespaced by model, KV dtype, block size and tenant.

A key names the KV of one full block *and everything before it*, so equal keys mean equal KV:

    root   = blake2b(len-prefixed "tandem/kv/v1", fingerprint, dtype, block_size, cache_salt)
    key[0] = blake2b(root     || int32le(tokens[0:B]))
    key[i] = blake2b(key[i-1] || int32le(tokens[i*B:(i+1)*B]))        # 16-byte digests

The readable form is LMCache-like: `tandem@v1@<fingerprint[:16]>@<dtype>@<B>@<32 hex>`. The
namespace is mixed into the chain root, so two tenants (salts) or two models never share a block
even where the readable prefix matches; the salt itself never appears in a key.

A request's partial last block (t < B tokens) lives under `...@tail-<32 hex>`, chained the same
way from the digest before it, and scoped to the request:

    tail   = blake2b(key[n-1] (root if n == 0) || NUL "tail" NUL || len-prefixed request_id
                     || int32le(tokens[n*B : n*B + t]))

so a tail key names its namespace, request and content: a worker recomputes it from its own
tokens and never reads a key a caller merely names.

Python's `hash()` is salted per process and must never be used here; blake2b is stable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

KEY_PREFIX = "tandem"
KEY_VERSION = "v1"
TAIL_TAG = "tail-"
DIGEST_BYTES = 16  # 128-bit digests: collisions are negligible even across billions of blocks
FINGERPRINT_CHARS = 16  # only for readability; the full fingerprint is hashed into the root
# KV dtypes the codec can carry; the names match str(torch.dtype) without "torch.".
KV_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8", "uint8",
             "uint4")
# A format whose blocks are tensors of another dtype: uint4 KV is packed two values a byte.
STORED_AS = {"uint4": "uint8"}
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True, slots=True)
class KeyNamespace:
    """Everything that must match for two blocks with the same tokens to hold the same KV.

    `dtype` accepts "float32", "torch.float32" or a torch.dtype and is stored by name.
    """

    model_fingerprint: str
    dtype: str
    block_size: int
    cache_salt: str = ""

    def __post_init__(self) -> None:
        name = str(self.dtype).removeprefix("torch.")
        object.__setattr__(self, "dtype", name)
        if name not in KV_DTYPES:
            raise ValueError(f"unsupported KV dtype {name!r}; expected one of {KV_DTYPES}")
        fp = self.model_fingerprint
        if not fp or "@" in fp or any(c.isspace() for c in fp):
            raise ValueError("model_fingerprint must be a non-empty string without '@'/spaces")
        if isinstance(self.block_size, bool) or int(self.block_size) <= 0:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        object.__setattr__(self, "block_size", int(self.block_size))

    @property
    def prefix(self) -> str:
        """The readable part shared by every key of this namespace (no salt, no hash)."""
        fp = self.model_fingerprint[:FINGERPRINT_CHARS]
        return f"{KEY_PREFIX}@{KEY_VERSION}@{fp}@{self.dtype}@{self.block_size}"

    def root(self) -> bytes:
        """The chain root: a digest of every namespace field, length-prefixed so that no two
        different namespaces can serialise to the same bytes."""
        h = hashlib.blake2b(digest_size=DIGEST_BYTES)
        fields = ("tandem/kv/v1", self.model_fingerprint, self.dtype, str(self.block_size),
                  self.cache_salt)
        for field in fields:
            raw = field.encode("utf-8")
            h.update(len(raw).to_bytes(4, "little"))
            h.update(raw)
        return h.digest()


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a key string says about the block it names (used to sanity-check decoded blocks)."""

    kind: str  # "block" | "tail"
    dtype: str
    block_size: int


def _token_bytes(token_ids) -> bytes:
    """int32 little-endian bytes of the token ids, so every host hashes the same bytes."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size and (int(ids.min()) < _INT32_MIN or int(ids.max()) > _INT32_MAX):
        raise ValueError("token ids must fit in int32")
    return ids.astype("<i4").tobytes()


class KeyChain:
    """The block keys of one growing sequence. Block i's key is chained from block i-1's
    digest, so keying a new block hashes that block's tokens only: a sequence of n blocks
    costs O(n) to key as it grows, not O(n^2) from rehashing the prefix each time.

        chain = KeyChain(ns)
        chain.extend(prompt_ids)          # keys of the prompt's full blocks
        chain.extend(prompt_ids + gen)    # + the blocks completed since (the rest unchanged)
        chain.keys                        # one per full block so far
    """

    __slots__ = ("keys", "_block_size", "_parent", "_prefix", "_root")

    def __init__(self, ns: KeyNamespace):
        self.keys: list[str] = []
        self._block_size = ns.block_size
        self._root = self._parent = ns.root()
        self._prefix = ns.prefix

    def copy(self) -> KeyChain:
        """A chain that goes on from here on its own (a fork: same prefix, own tokens)."""
        other = object.__new__(KeyChain)
        other.keys = list(self.keys)
        other._block_size, other._parent = self._block_size, self._parent
        other._prefix, other._root = self._prefix, self._root
        return other

    def extend(self, token_ids) -> list[str]:
        """Key the full blocks of `token_ids` (the whole sequence so far: list, array or CPU
        tensor of ints) past those already keyed, and return the new keys. The tokens already
        keyed must be the ones given before: only the new blocks are read."""
        B = self._block_size
        start, end = len(self.keys) * B, len(token_ids) // B * B
        if end <= start:
            return []
        raw = _token_bytes(token_ids[start:end])
        step = 4 * B  # bytes per block of int32 ids
        new = []
        for offset in range(0, len(raw), step):
            self._parent = hashlib.blake2b(self._parent + raw[offset:offset + step],
                                           digest_size=DIGEST_BYTES).digest()
            new.append(f"{self._prefix}@{self._parent.hex()}")
        self.keys += new
        return new

    def tail_key(self, request_id: str, token_ids, end: int | None = None) -> str:
        """The key of the partial block that ends at `end` (default len(token_ids)): tokens
        [end // B * B, end) of `token_ids`, for request `request_id`. The full blocks before it
        must be keyed already (extend() with at least those tokens)."""
        B = self._block_size
        end = len(token_ids) if end is None else end
        full = end // B
        if not 0 <= end <= len(token_ids) or full > len(self.keys):
            raise ValueError(f"tail ending at {end} needs {full} keyed blocks of "
                             f"{len(token_ids)} tokens; {len(self.keys)} are keyed")
        parent = self._root if full == 0 else bytes.fromhex(self.keys[full - 1].rsplit("@")[-1])
        rid = request_id.encode("utf-8")
        h = hashlib.blake2b(parent + b"\0tail\0" + len(rid).to_bytes(4, "little") + rid,
                            digest_size=DIGEST_BYTES)
        h.update(_token_bytes(token_ids[full * B : end]))
        return f"{self._prefix}@{TAIL_TAG}{h.hexdigest()}"


def block_keys(token_ids, ns: KeyNamespace) -> list[str]:
    """One key per *full* block of `token_ids` (list, array or CPU tensor of ints); the
    partial tail (len % block_size tokens) gets no key here, see `tail_key`."""
    return KeyChain(ns).extend(token_ids)


def tail_key(request_id: str, ns: KeyNamespace, token_ids=()) -> str:
    """The request-scoped key of the partial last block of `token_ids` (stored with a short
    TTL): it covers the tokens past the last full block, chained from that block's key."""
    chain = KeyChain(ns)
    chain.extend(token_ids)
    return chain.tail_key(request_id, token_ids)


def parse_key(key: str) -> KeyInfo | None:
    """KeyInfo for a key made by this module, else None (the store accepts any string key)."""
    parts = key.split("@")
    if len(parts) != 6 or parts[0] != KEY_PREFIX or parts[1] != KEY_VERSION:
        return None
    dtype, size, tag = parts[3], parts[4], parts[5]
    if dtype not in KV_DTYPES or not size.isdigit():
        return None
    kind = "tail" if tag.startswith(TAIL_TAG) else "block"
    return KeyInfo(kind, dtype, int(size))


def is_tail_key(key: str) -> bool:
    info = parse_key(key)
    return info is not None and info.kind == "tail"
