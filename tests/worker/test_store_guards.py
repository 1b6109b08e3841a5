"""What a caller can make a worker do to the KV store: the prompt's tail is read only under the key
the worker derives from its own tokens (a forged key is never read, so never deleted), the
prefill and decode workers derive the same key, and a write backlog past max_pending_writes
drops writes (counted) instead of growing, with the prefill's commit line still sent."""

from __future__ import annotations

import threading

import pytest
import torch

from kvstore import KeyNamespace, block_keys, tail_key
from tests.worker.apps import BLOCK, PROMPT, client, decode_body, lines, worker_of


@pytest.fixture(scope="module")
def decode(tiny_folder):
    with client("decode", tiny_folder) as c:
        yield c


def _reads(worker, monkeypatch) -> list[str]:
    """Every key the worker's store is asked for, from now on."""
    seen: list[str] = []
    get_many = worker.store.get_many

    def spy(keys, **kwargs):
        seen.extend(keys)
        return get_many(keys, **kwargs)

    monkeypatch.setattr(worker.store, "get_many", spy)
    return seen


def _tail(worker, t: int) -> torch.Tensor:
    L, two, H, _, D = worker.engine.layout.block_shape
    return torch.zeros(L, two, H, t, D)  # [L, 2, H, t, D]


def _forged(ns: KeyNamespace, rid: str, prompt: list[int]) -> dict[str, str]:
    other_ns = KeyNamespace(ns.model_fingerprint, ns.dtype, ns.block_size, "another-tenant")
    return {
        "another namespace": tail_key(rid, other_ns, prompt),
        "another request": tail_key("someone-else", ns, prompt),
        "other tokens": tail_key(rid, ns, prompt[:-1] + [prompt[-1] + 1]),
        "a block key": block_keys(PROMPT, ns)[0],
        "random": f"{ns.prefix}@tail-{'ab' * 16}",
        "outside the store's keys": "secrets/of-someone",
    }


@pytest.mark.parametrize("kind", list(_forged(KeyNamespace("f", "float32", BLOCK), "r", [1])))
def test_a_forged_tail_key_is_never_read(decode, monkeypatch, kind):
    w = worker_of(decode)
    prompt, rid = PROMPT[:10], f"forged-{kind}"  # under one block: the tail is the prefix
    salt = rid  # a namespace per case: no resident KV is shared between them
    ns = w.namespace(salt)
    forged = _forged(ns, rid, prompt)[kind]
    w.store.put_many({forged: _tail(w, len(prompt))})
    reads = _reads(w, monkeypatch)
    loaded = w.counters.prefix_tokens_loaded_total
    body = decode_body(rid, prompt + [7], len(prompt), tail_key=forged, tail_start=0,
                       cache_salt=salt)
    r = decode.post("/generate", json=body)
    assert r.status_code == 200 and lines(r.text)[0]["num_cached_tokens"] == 0
    assert forged not in reads and w.counters.prefix_tokens_loaded_total == loaded
    assert w.store.lookup_prefix([forged]) == 1  # still there: never read, never deleted


@pytest.mark.parametrize("generated", [1, 30])  # a handoff, and a failover resume past a block
def test_the_real_tail_key_is_read(decode, monkeypatch, generated):
    w = worker_of(decode)
    rid = salt = f"real-{generated}"
    ns = w.namespace(salt)
    prompt = PROMPT  # 2 blocks + an 8-token tail
    key = tail_key(rid, ns, prompt)
    blocks = block_keys(prompt, ns)
    w.store.put_many({k: torch.zeros(w.engine.layout.block_shape) for k in blocks})
    w.store.put_many({key: _tail(w, 8)})
    reads = _reads(w, monkeypatch)
    tokens = prompt + [7] * generated
    body = decode_body(rid, tokens, len(prompt), tail_key=key, tail_start=2 * BLOCK,
                       cache_salt=salt)
    r = decode.post("/generate", json=body)
    assert r.status_code == 200 and key in reads
    assert lines(r.text)[0]["num_cached_tokens"] == len(prompt)
    # The right key with a wrong start is no claim of this prompt's tail either.
    other = rid + "-start"
    w.store.put_many({tail_key(other, ns, prompt): _tail(w, 8)})
    body = decode_body(other, tokens, len(prompt), tail_key=tail_key(other, ns, prompt),
                       tail_start=BLOCK, cache_salt=salt)
    assert decode.post("/generate", json=body).status_code == 200
    assert tail_key(other, ns, prompt) not in reads


def test_prefill_and_decode_derive_the_same_tail_key(tiny_folder, tmp_path):
    shared = dict(store_tiers="memory+disk", disk_cache_dir=tmp_path)
    rid = "handoff"
    with client("prefill", tiny_folder, **shared) as pre:
        r = pre.post("/prefill", json=decode_body(rid, PROMPT))
        head, commit = lines(r.text)
        assert commit["committed"] and commit["stored_bytes"] > 0
        assert head["tail_key"] == tail_key(rid, worker_of(pre).namespace(""), PROMPT)
    with client("decode", tiny_folder, **shared) as dec:
        first = head["event"]["token_id"]
        body = decode_body(rid, PROMPT + [first], len(PROMPT), tail_key=head["tail_key"],
                           tail_start=head["tail_start"])
        r = dec.post("/generate", json=body)
        assert r.status_code == 200
        assert lines(r.text)[0]["num_cached_tokens"] == len(PROMPT)  # blocks + tail, all loaded
        assert worker_of(dec).counters.admit_tokens_computed_total == 1


def test_a_full_write_backlog_drops_writes_and_still_commits(tiny_folder):
    with client("prefill", tiny_folder, max_pending_writes=1) as pre:
        w = worker_of(pre)
        entered, release = threading.Event(), threading.Event()
        put_many = w.store.put_many

        def slow_put(items, ttl_s=None):
            entered.set()
            assert release.wait(60)
            return put_many(items, ttl_s=ttl_s)

        w.store.put_many = slow_put
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=pre.post(
            "/prefill", json=decode_body("slow", PROMPT))))
        t.start()
        assert entered.wait(60)  # the one allowed write is stuck in the store
        r = pre.post("/prefill", json=decode_body("dropped", PROMPT[::-1]))
        head, commit = lines(r.text)  # answered at once, though nothing was stored
        assert commit == {"committed": True, "stored_bytes": 0}
        assert w.counters.blocks_write_dropped_total == 3  # 2 blocks + the tail
        release.set()
        t.join(timeout=60)
        assert lines(first["r"].text)[1]["stored_bytes"] > 0
        assert w.counters.blocks_written_total == 3 and w.pending_writes == 0
        metrics = pre.get("/metrics").text
        assert "tandem:worker_blocks_write_dropped_total" in metrics
