"""Block keys: deterministic across processes, chained, namespaced."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.keys import KeyChain, KeyNamespace, block_keys, parse_key, tail_key
from tests.kvstore.helpers import FINGERPRINT, make_ns

REPO = Path(__file__).resolve().parents[2]
TOKENS = [(i * 7919) % 49152 for i in range(300)]  # 300 tokens: 4 full blocks of 64 + 44

_CHILD = """
import json, sys
from kvstore.keys import KeyNamespace, block_keys, tail_key
tokens = json.loads(sys.argv[1])
out = {}
for salt in ("", "tenant-a"):
    ns = KeyNamespace(sys.argv[2], "bfloat16", 64, salt)
    out[salt] = {"blocks": block_keys(tokens, ns), "tail": tail_key("req-42", ns)}
print(json.dumps(out))
"""


def _keys_here() -> dict:
    out = {}
    for salt in ("", "tenant-a"):
        ns = KeyNamespace(FINGERPRINT, "bfloat16", 64, salt)
        out[salt] = {"blocks": block_keys(TOKENS, ns), "tail": tail_key("req-42", ns)}
    return out


def test_two_processes_compute_identical_keys():
    # Different PYTHONHASHSEEDs: a key that leaned on hash() would differ between them.
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(TOKENS), FINGERPRINT],
                              cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed})
             for seed in ("1", "2")]
    outputs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1] == _keys_here()
    assert len(outputs[0][""]["blocks"]) == 4


def test_key_format_is_readable():
    ns = KeyNamespace(FINGERPRINT, torch.bfloat16, 64)
    key = block_keys(TOKENS, ns)[0]
    assert key.startswith(f"tandem@v1@{FINGERPRINT[:16]}@bfloat16@64@")
    assert len(key.rsplit("@", 1)[1]) == 32
    assert parse_key(key).kind == "block"
    assert parse_key(tail_key("r", ns)).kind == "tail"
    assert parse_key("some-other-key") is None


def test_only_full_blocks_get_keys():
    ns = make_ns(block_size=64)
    assert len(block_keys(TOKENS[:63], ns)) == 0
    assert len(block_keys(TOKENS[:64], ns)) == 1
    assert len(block_keys(TOKENS[:191], ns)) == 2


def test_keys_are_chained():
    ns = make_ns(block_size=64)
    base = block_keys(TOKENS, ns)
    assert block_keys(TOKENS[:128], ns) == base[:2]
    edited = list(TOKENS)
    edited[130] += 1  # a token in block 2: blocks 0-1 keep their keys, 2 onwards change
    keys = block_keys(edited, ns)
    assert keys[:2] == base[:2] and all(a != b for a, b in zip(keys[2:], base[2:], strict=True))
    edited[0] += 1  # block 0 changes every key after it too
    assert not set(block_keys(edited, ns)) & set(base)


def test_same_block_at_different_positions_has_different_keys():
    ns = make_ns(block_size=4)
    keys = block_keys([1, 2, 3, 4] * 3, ns)
    assert len(set(keys)) == 3


def test_namespaces_are_disjoint():
    variants = [make_ns(torch.bfloat16, 64), make_ns(torch.bfloat16, 64, salt="tenant-a"),
                make_ns(torch.bfloat16, 64, salt="tenant-b"),
                make_ns(torch.bfloat16, 64, fingerprint="f" * 32),
                make_ns(torch.bfloat16, 64, fingerprint=FINGERPRINT + "00"),  # same 16 chars
                make_ns(torch.float16, 64), make_ns(torch.float32, 64),
                make_ns(torch.bfloat16, 32)]
    seen: set[str] = set()
    for ns in variants:
        keys = set(block_keys(TOKENS, ns)) | {tail_key("req-1", ns)}
        assert not keys & seen, ns
        seen |= keys
    salted = block_keys(TOKENS, variants[1])[0] + tail_key("req-1", variants[1])
    assert "tenant-a" not in salted


def test_tail_key_is_request_scoped():
    ns = make_ns()
    assert tail_key("a", ns) != tail_key("b", ns)
    assert tail_key("a", ns) == tail_key("a", make_ns())
    assert tail_key("a", ns, TOKENS) != tail_key("b", ns, TOKENS)


def test_tail_key_names_its_content():
    ns = make_ns(block_size=64)
    base = tail_key("r", ns, TOKENS)  # 4 blocks + a 44-token tail
    assert parse_key(base).kind == "tail" and base.startswith(ns.prefix + "@tail-")
    tail_edit, block_edit = list(TOKENS), list(TOKENS)
    tail_edit[-1] += 1  # a token of the tail itself
    block_edit[5] += 1  # a token of a block before it
    keys = {base, tail_key("r", ns, tail_edit), tail_key("r", ns, block_edit),
            tail_key("r", ns, TOKENS[:-1]), tail_key("r", make_ns(salt="other"), TOKENS)}
    assert len(keys) == 5
    assert base not in block_keys(TOKENS, ns)


def test_chain_tail_key_matches_at_any_end():
    """A decode worker keys prompt + generated tokens, then asks for the prompt's tail."""
    ns = make_ns(block_size=64)
    prompt, more = TOKENS[:150], TOKENS[150:]
    chain = KeyChain(ns)
    chain.extend(prompt + more)  # 4 blocks keyed: past the prompt's tail
    assert chain.tail_key("r", prompt + more, len(prompt)) == tail_key("r", ns, prompt)
    assert chain.tail_key("r", prompt + more) == tail_key("r", ns, TOKENS)
    assert KeyChain(ns).tail_key("r", prompt[:10]) == tail_key("r", ns, prompt[:10])
    with pytest.raises(ValueError):
        KeyChain(ns).tail_key("r", prompt)  # its 2 full blocks are not keyed


def test_token_inputs_are_equivalent():
    ns = make_ns(block_size=64)
    expected = block_keys(TOKENS, ns)
    assert block_keys(np.array(TOKENS, dtype=np.int64), ns) == expected
    assert block_keys(torch.tensor(TOKENS, dtype=torch.int32), ns) == expected
    assert block_keys(tuple(TOKENS), ns) == expected


@pytest.mark.parametrize("bad", [[2**31], [-(2**31) - 1]])
def test_token_ids_must_fit_int32(bad):
    with pytest.raises(ValueError):
        block_keys(bad * 4, make_ns())


@pytest.mark.parametrize("kwargs", [dict(dtype="float64"), dict(block_size=0),
                                    dict(model_fingerprint=""), dict(model_fingerprint="a@b")])
def test_namespace_validation(kwargs):
    args = dict(model_fingerprint=FINGERPRINT, dtype="float32", block_size=64) | kwargs
    with pytest.raises(ValueError):
        KeyNamespace(**args)


def test_namespace_normalises_dtype():
    assert make_ns(torch.bfloat16) == KeyNamespace(FINGERPRINT, "torch.bfloat16", 4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**31 - 1), max_size=40), st.integers(1, 8))
def test_keys_of_a_prefix_are_a_prefix(tokens, block_size):
    ns = make_ns(block_size=block_size)
    keys = block_keys(tokens, ns)
    assert len(keys) == len(tokens) // block_size
    cut = len(tokens) // 2
    assert block_keys(tokens[:cut], ns) == keys[:cut // block_size]


def _reference_keys(tokens: list[int], ns: KeyNamespace) -> list[str]:
    """The chain as the module docstring defines it, written out independently."""
    parent, keys, B = ns.root(), [], ns.block_size
    for i in range(len(tokens) // B):
        raw = np.asarray(tokens[i * B:(i + 1) * B], dtype="<i4").tobytes()
        parent = hashlib.blake2b(parent + raw, digest_size=16).digest()
        keys.append(f"{ns.prefix}@{parent.hex()}")
    return keys


def test_block_keys_follow_the_documented_chain():
    ns = make_ns()
    assert block_keys(TOKENS, ns) == _reference_keys(TOKENS, ns)


@given(st.lists(st.integers(0, 49151), max_size=300), st.lists(st.integers(1, 90), min_size=1))
@settings(max_examples=50, deadline=None)
def test_chain_grown_in_any_steps_equals_keying_at_once(tokens, steps):
    """However a sequence grows (one token at a time, blocks at once, partial blocks), the
    chain ends with the keys of the whole sequence, and each extend returns only new keys."""
    ns = KeyNamespace(FINGERPRINT, "float32", 16)
    chain, seen, n, i = KeyChain(ns), [], 0, 0
    while n < len(tokens):
        n = min(len(tokens), n + steps[i % len(steps)])
        i += 1
        seen += chain.extend(tokens[:n])
    assert seen == chain.keys == block_keys(tokens, ns)
