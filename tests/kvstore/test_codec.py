"""The blob codec: bit-exact round trips and every kind of damage detected."""

from __future__ import annotations

import struct
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.codec import VERSION, CorruptBlock, ExpiredBlock, decode, encode, read_expiry
from kvstore.keys import block_keys, tail_key
from tests.kvstore.helpers import SMALL_SHAPE, SMOL_SHAPE, bit_equal, make_block, make_ns

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _key(shape, dtype) -> str:
    return block_keys(range(shape[3]), make_ns(dtype, shape[3]))[0]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("shape", [SMALL_SHAPE, SMOL_SHAPE])
def test_round_trip_is_bit_exact(shape, dtype):
    block = make_block(shape, dtype, seed=3)
    key = _key(shape, dtype)
    blob = encode(key, block)
    for copy in (True, False):
        assert bit_equal(decode(blob, key, copy=copy), block)
    assert bit_equal(decode(bytes(blob), key), block)  # a read-only buffer (redis-py's bytes)


def test_decoded_tensor_is_independent_when_copied():
    block = make_block()
    blob = encode("k", block)
    out = decode(blob, "k")
    out.zero_()
    assert bit_equal(decode(blob, "k"), block)


def test_non_contiguous_input_and_arbitrary_keys():
    block = make_block((4, 2, 1, 4, 8)).transpose(0, 2)
    assert bit_equal(decode(encode("any key ✓", block), "any key ✓"), block.contiguous())


def test_unsupported_dtype_is_a_caller_error():
    with pytest.raises(ValueError):
        encode("k", torch.zeros(3, dtype=torch.float64))


def _flip(blob, offset: int) -> bytearray:
    out = bytearray(blob)
    out[offset] ^= 0x01
    return out


def _reason(blob, key: str) -> str:
    with pytest.raises(CorruptBlock) as err:
        decode(blob, key)
    return err.value.args[0]


def test_corruption_is_detected_everywhere():
    key = _key(SMALL_SHAPE, torch.float32)
    blob = encode(key, make_block())
    for offset in range(len(blob)):  # every single-bit flip, header, key, padding and payload
        if 29 <= offset < 32:
            continue  # reserved bytes: not read, but still checksummed
        _reason(_flip(blob, offset), key)
    assert _reason(_flip(blob, len(blob) - 1), key) == "checksum mismatch"
    assert _reason(_flip(blob, 29), key) == "checksum mismatch"
    assert _reason(_flip(blob, 28), key) == "MAC length 1"
    assert _reason(_flip(blob, 0), key) == "bad magic"


def test_truncated_and_extended_blobs():
    blob = encode("k", make_block())
    assert _reason(blob[:-1], "k") == "size does not match shape"
    assert _reason(bytes(blob) + b"\0", "k") == "size does not match shape"
    assert _reason(blob[:10], "k") == "short blob"
    assert _reason(b"", "k") == "short blob"


def test_wrong_key_is_a_miss():
    blob = encode("k1", make_block())
    assert _reason(blob, "k2") == "key mismatch"


@pytest.mark.parametrize("version", [1, VERSION + 1])  # 1: before the MAC (no tag byte)
def test_other_format_version_is_a_miss(version):
    blob = bytearray(encode("k", make_block()))
    struct.pack_into("<H", blob, 4, version)
    assert _reason(blob, "k") == f"format version {version}"


def test_block_must_match_what_its_key_says():
    ns = make_ns(torch.float32, block_size=4)
    key = block_keys(range(4), ns)[0]
    assert _reason(encode(key, make_block((2, 2, 1, 8, 8))), key) == "token count differs from key"
    assert _reason(encode(key, make_block(dtype=torch.float16)), key) == "dtype differs from key"
    assert _reason(encode(key, make_block((4, 8))), key) == "not a [L, 2, H, B, D] block"
    tail = tail_key("req", ns)
    assert decode(encode(tail, make_block((2, 2, 1, 3, 8))), tail).shape[3] == 3
    full = encode(tail, make_block((2, 2, 1, 4, 8)))  # a tail holds fewer than B tokens
    assert _reason(full, tail) == "token count differs from key"


def test_expiry():
    blob = encode("k", make_block(), expires_at=time.time() + 60)
    assert read_expiry(blob) > time.time()
    decode(blob, "k")
    with pytest.raises(ExpiredBlock):
        decode(blob, "k", now=time.time() + 61)


def test_view_without_copy_shares_the_buffer():
    blob = bytearray(encode("k", make_block()))
    out = decode(blob, "k", copy=False)
    out.view(-1)[0] = 0
    assert decode(blob, "k", verify=False, copy=False).view(-1)[0] == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=0, max_size=4), st.sampled_from(DTYPES),
       st.text(min_size=1, max_size=80), st.integers(0, 2**32 - 1))
def test_round_trip_property(shape, dtype, key, seed):
    block = make_block(tuple(shape), dtype, seed)
    assert bit_equal(decode(encode(key, block), key), block)


def test_unchecksummed_blob_is_for_in_process_use_only():
    blob = encode("k", make_block(), checksum=False)  # what a memory-only store keeps
    assert bit_equal(decode(blob, "k", verify=False), make_block())
    assert _reason(blob, "k") == "checksum mismatch"
