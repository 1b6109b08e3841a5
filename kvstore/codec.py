"""Safe binary encoding of one KV tensor: a small fixed header, the key, the raw bytes, a tag.

    offset  size       field
    0       4          magic b"TKVB"
    4       2          format version (u16): 2
    6       1          dtype code (u8, see _DTYPE_CODES)
    7       1          ndim (u8)
    8       8          xxh3_64 of bytes [0, 8) + [16, end): header, key and payload (0 if MAC'd)
    16      8          expires_at (f64, unix seconds; 0 = never)
    24      2          key length in bytes (u16)
    26      2          header length (u16): 32 + 8*ndim + key, padded to 64 bytes
    28      1          MAC length (u8): 0, or MAC_BYTES when the blob ends with a MAC
    29      3          reserved (zero)
    32      8*ndim     shape (u64 each)
    ...     key        key, utf-8
    hlen    numel*size payload: the tensor's bytes, C order, native little-endian
    end-16  16         (keyed stores only) BLAKE2b-128 MAC, keyed by mac_key, of bytes [0, end-16)

Two kinds of integrity, chosen by the store, never by the blob:
- no mac_key: the xxh3 checksum catches bit rot (a torn file, a flipped bit), nothing more:
  anyone who can write the disk folder or Redis can forge a block that passes it.
- mac_key: the MAC replaces the checksum, and decoding demands it. A block from a writer
  without the key (forged, or from a keyless store), or written under another key, is a
  CorruptBlock: a counted miss, never loaded. The MAC covers the header, and the header holds
  the block's key, which decode compares with the key asked for, so a block copied under
  another key (file name, Redis key) is a miss too.

Version 1 (no MAC length byte, no tag) is read as a CorruptBlock("format version 1"), a miss.

No pickle, no torch.load: decoding only reads numbers and copies bytes. bf16/fp8 travel as raw
bytes, so every dtype round-trips bit-exactly. Padding the header to 64 bytes keeps the payload
aligned when a decoded tensor views the blob in place; the MAC goes after the payload for the
same reason.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
import time
from types import MappingProxyType

import numpy as np
import torch
import xxhash

from kvstore.keys import STORED_AS, parse_key

MAGIC = b"TKVB"
VERSION = 2  # 2: the MAC length byte and the trailing MAC
HEADER_ALIGN = 64  # bytes; payload alignment inside a blob
MAX_KEY_BYTES = 1024  # ours are ~75; the bound keeps the u16 header length far from overflow
# 128-bit tag: a forger's chance per try is 2^-128, and a shorter BLAKE2b digest costs the same.
MAC_BYTES = 16
MAC_PERSON = b"tandem-kv-mac"  # BLAKE2b personalization: this secret's use for the KV store only
_FIXED = struct.Struct("<4sHBBQdHHB3x")  # the 32-byte fixed header above
_CHECKSUM_AT = 8  # byte offset of the checksum field, which the checksum skips
_DTYPE_CODES = MappingProxyType({
    torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5, torch.int8: 6, torch.uint8: 7,
})
_CODE_DTYPES = MappingProxyType({code: dtype for dtype, code in _DTYPE_CODES.items()})

Blob = bytes | bytearray | memoryview  # what tiers store and return


class CorruptBlock(Exception):
    """The blob is not a valid encoding of the block under this key (reason in args[0])."""


class ExpiredBlock(Exception):
    """The blob is valid but its TTL has passed."""


def derive_mac_key(secret: str) -> bytes:
    """The store's 32-byte MAC key from a shared secret (e.g. the cluster's internal token).

    A personalized BLAKE2b of the secret, not the secret itself: the raw token is never a key
    here, and a MAC key that leaks does not give back the token.
    """
    if not secret:
        raise ValueError("derive_mac_key needs a non-empty secret (an empty one is public)")
    return hashlib.blake2b(secret.encode("utf-8"), digest_size=32, person=MAC_PERSON).digest()


def _checksum(mv: memoryview) -> int:
    h = xxhash.xxh3_64(mv[:_CHECKSUM_AT])
    h.update(mv[_CHECKSUM_AT + 8:])
    return h.intdigest()


def _mac(signed: memoryview, mac_key: bytes) -> bytes:
    """BLAKE2b MAC of everything before the tag (hashlib drops the GIL for large buffers)."""
    return hashlib.blake2b(signed, key=mac_key, digest_size=MAC_BYTES).digest()


def _memcpy(dst: np.ndarray, src) -> None:
    """Single-threaded copy. torch's copy_ fans out to the OpenMP pool, which on a busy 2-vCPU
    host turned a 64 KiB copy into 11 ms of spinning; the store must not compete with the
    engine's threads."""
    np.copyto(dst, np.frombuffer(src, dtype=np.uint8))


def _header_len(ndim: int, key_len: int) -> int:
    raw = _FIXED.size + 8 * ndim + key_len
    return -(-raw // HEADER_ALIGN) * HEADER_ALIGN


def encode(key: str, tensor: torch.Tensor, expires_at: float = 0.0,
           checksum: bool = True, mac_key: bytes | None = None) -> memoryview:
    """Encode `tensor` under `key` into one fresh buffer (one copy of the payload + checksum).

    mac_key: end the blob with a keyed BLAKE2b MAC instead of the xxh3 checksum.
    checksum=False leaves the field 0 and adds no MAC: only for blobs that never leave the
    process (a memory-only store), where hashing 1.47 MB would cost a third of the put for
    nothing.
    """
    code = _DTYPE_CODES.get(tensor.dtype)
    if code is None:
        raise ValueError(f"kvstore cannot encode dtype {tensor.dtype}")
    kb = key.encode("utf-8")
    if len(kb) > MAX_KEY_BYTES:
        raise ValueError(f"kvstore keys are at most {MAX_KEY_BYTES} bytes")
    t = tensor.detach().to("cpu").contiguous()
    hlen = _header_len(t.dim(), len(kb))
    nbytes = t.numel() * t.element_size()
    mac_len = MAC_BYTES if checksum and mac_key is not None else 0
    # torch.empty, not bytearray: no zero-fill of bytes we overwrite at once.
    out = torch.empty(hlen + nbytes + mac_len, dtype=torch.uint8).numpy()
    if nbytes:
        _memcpy(out[hlen:hlen + nbytes], t.reshape(-1).view(torch.uint8).numpy())
    mv = memoryview(out)
    _FIXED.pack_into(mv, 0, MAGIC, VERSION, code, t.dim(), 0, expires_at, len(kb), hlen,
                     mac_len)
    struct.pack_into(f"<{t.dim()}Q", mv, _FIXED.size, *t.shape)
    end = _FIXED.size + 8 * t.dim()
    mv[end:end + len(kb)] = kb
    mv[end + len(kb):hlen] = bytes(hlen - end - len(kb))
    if mac_len:
        mv[hlen + nbytes:] = _mac(mv[:hlen + nbytes], mac_key)
    elif checksum:
        struct.pack_into("<Q", mv, _CHECKSUM_AT, _checksum(mv))
    return mv


def read_expiry(blob: Blob) -> float:
    """expires_at (unix seconds, 0 = never) of a blob that already decoded cleanly."""
    return _FIXED.unpack_from(blob, 0)[5]


def _check_key_info(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """A block key says its dtype and block size: [L, 2, H, B, D], or t < B tokens for a tail."""
    info = parse_key(key)
    if info is None:
        return
    if str(dtype).removeprefix("torch.") != STORED_AS.get(info.dtype, info.dtype):
        raise CorruptBlock("dtype differs from key")
    if len(shape) != 5 or shape[1] != 2:
        raise CorruptBlock("not a [L, 2, H, B, D] block")
    tokens_ok = shape[3] == info.block_size if info.kind == "block" else shape[3] < info.block_size
    if not tokens_ok:
        raise CorruptBlock("token count differs from key")


def _parse_header(mv: memoryview,
                  key: str) -> tuple[torch.dtype, tuple[int, ...], int, float, int]:
    if mv.nbytes < _FIXED.size:
        raise CorruptBlock("short blob")
    magic, version, code, ndim, _, expires, klen, hlen, mac_len = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptBlock("bad magic")
    if version != VERSION:
        raise CorruptBlock(f"format version {version}")
    dtype = _CODE_DTYPES.get(code)
    if dtype is None:
        raise CorruptBlock(f"dtype code {code}")
    if hlen != _header_len(ndim, klen) or mv.nbytes < hlen:
        raise CorruptBlock("bad header length")
    if mac_len not in (0, MAC_BYTES):
        raise CorruptBlock(f"MAC length {mac_len}")
    shape = struct.unpack_from(f"<{ndim}Q", mv, _FIXED.size)
    key_at = _FIXED.size + 8 * ndim
    if mv[key_at:key_at + klen] != key.encode("utf-8"):
        raise CorruptBlock("key mismatch")
    if mv.nbytes != hlen + math.prod(shape) * dtype.itemsize + mac_len:
        raise CorruptBlock("size does not match shape")
    return dtype, shape, hlen, expires, mac_len


def _verify(mv: memoryview, mac_len: int, mac_key: bytes | None) -> None:
    """The blob's MAC (a keyed store: required) or its checksum (a keyless store)."""
    if mac_key is not None:
        if not mac_len:
            raise CorruptBlock("no MAC")
        expected = _mac(mv[:-mac_len], mac_key)
        if not hmac.compare_digest(bytes(mv[-mac_len:]), expected):
            raise CorruptBlock("MAC mismatch")
    elif mac_len:
        raise CorruptBlock("MAC-protected block, but this store has no key")
    elif struct.unpack_from("<Q", mv, _CHECKSUM_AT)[0] != _checksum(mv):
        raise CorruptBlock("checksum mismatch")


def decode(blob: Blob, key: str, *, verify: bool = True, copy: bool = True,
           now: float | None = None, mac_key: bytes | None = None) -> torch.Tensor:
    """The tensor stored under `key`. Raises CorruptBlock or ExpiredBlock, nothing else.

    verify:  check the MAC or checksum (skip only for blobs this process made or verified).
    mac_key: the store's key: the blob must carry a valid MAC under it. None: the blob must
             carry no MAC and a valid xxh3 checksum.
    copy:    return a fresh tensor. With copy=False and a writable blob the tensor views the
             blob, which must then not be shared (e.g. a buffer just read from disk or Redis).
    """
    mv = memoryview(blob).cast("B")
    dtype, shape, hlen, expires, mac_len = _parse_header(mv, key)
    if verify:
        _verify(mv, mac_len, mac_key)
    if expires and expires < (time.time() if now is None else now):
        raise ExpiredBlock(key)
    _check_key_info(key, dtype, shape)
    payload = mv[hlen:mv.nbytes - mac_len]
    if payload.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if copy or mv.readonly:
        out = torch.empty(payload.nbytes, dtype=torch.uint8)
        _memcpy(out.numpy(), payload)
    else:
        out = torch.frombuffer(payload, dtype=torch.uint8)
    return out.view(dtype).view(shape)
