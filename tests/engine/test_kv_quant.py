"""Quantized KV (engine/kv_quant.py): rows stored as int8 or uint4 with a scale per token and
head, in the pool, the cold tier and the handoff; attention reads them dequantized."""

from __future__ import annotations

import pytest
import torch

from engine.cold_kv import HostColdTier
from engine.engine import Engine, EngineConfig
from engine.kv_quant import dequantize, quantize, rotation
from engine.sequence import SeqRequest
from kvstore.codec import CorruptBlock, decode, encode
from kvstore.keys import KeyNamespace, block_keys
from tests.engine.helpers import greedy, make_request, run


@pytest.mark.parametrize("quant,levels", [("int8", 254), ("uint4", 30)])
def test_a_rows_error_is_within_half_a_step_of_its_own_range(quant, levels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 64, generator=g) * torch.logspace(-3, 2, 7)[:, None, None]
    y = dequantize(quantize(x, quant), quant, torch.float32)
    span = (x.abs().amax(-1) * 2) if quant == "int8" else (x.amax(-1) - x.amin(-1))
    # half a quantization step, plus the fp16 rounding of uint4's scale and minimum
    bound = span / levels * 1.01 + (0 if quant == "int8" else x.abs().amax(-1) * 2e-3)
    assert ((y - x).abs().amax(-1) <= bound).all()


@pytest.mark.parametrize("quant", ["int8", "uint4"])
def test_zero_rows_and_strided_reads_dequantize_cleanly(quant):
    q = quantize(torch.zeros(4, 2, 64), quant)  # a fresh page is zero bytes: so is this
    assert torch.equal(dequantize(q, quant, torch.float32), torch.zeros(4, 2, 64))
    assert torch.equal(dequantize(torch.zeros_like(q), quant, torch.float32),
                       torch.zeros(4, 2, 64))
    x = torch.randn(6, 3, 64)
    stored = quantize(x, quant)
    strided = stored.transpose(0, 1)  # [3, 6, W], not contiguous, as attention reads pages
    assert torch.equal(dequantize(strided, quant, torch.float32),
                       dequantize(stored, quant, torch.float32).transpose(0, 1))


@pytest.mark.parametrize("quant,row,per_token", [("int8", 68, 12240), ("uint4", 36, 6480)])
def test_the_pool_stores_quantized_rows(smollm_fp32, quant, row, per_token):
    engine = Engine(smollm_fp32, EngineConfig(kv_dtype=quant))
    assert engine.pool.kv.shape[-1] == row and engine.layout.token_bytes == per_token
    assert engine.layout.name == quant
    exact = Engine(smollm_fp32, EngineConfig(kv_cache_bytes=engine.pool.kv.nbytes))
    assert engine.pool.num_pages >= exact.pool.num_pages * 46080 // per_token - 1


def test_int8_kv_decodes_like_exact_kv_uint4_close(smollm_fp32, prompt_ids):
    """Greedy text over the test prompts: int8 follows exact KV, uint4 in part (over 50
    prompts its leading tokens agree 20.8%, docs/BENCHMARKS.md; here 0.26-0.45 as the batched
    forward's GEMMs changed, so the bound only says it is not noise)."""
    runs = {}
    for kv in ("auto", "int8", "uint4"):
        reqs = [make_request(str(i), ids, greedy(24, ignore_eos=True))
                for i, ids in enumerate(prompt_ids)]
        out = run(Engine(smollm_fp32, EngineConfig(kv_dtype=kv)), reqs)
        runs[kv] = [out[str(i)].tokens for i in range(len(prompt_ids))]

    def agree(a, b):  # leading tokens in common, over all prompts
        same = 0
        for x, y in zip(a, b, strict=True):
            same += next((i for i, (u, v) in enumerate(zip(x, y, strict=True)) if u != v), len(x))
        return same / sum(len(x) for x in a)

    assert agree(runs["int8"], runs["auto"]) >= 0.9
    assert agree(runs["uint4"], runs["auto"]) >= 0.15


def test_quantized_kv_hands_off_bit_exact_and_refuses_exact_blocks(smollm_fp32, prompt_ids):
    ids = prompt_ids[-1][:150]
    config = EngineConfig(kv_dtype="int8")
    want = run(Engine(smollm_fp32, config), [make_request("r", ids, greedy(10))])["r"].tokens
    prefill = Engine(smollm_fp32, config)
    prefill.add(make_request("r", ids, greedy(10), prefill_only=True))
    (first,) = prefill.step()
    B = prefill.layout.block_size
    n = len(ids) // B
    blocks = prefill.export_blocks("r", 0, n)
    tail = prefill.export_kv("r", n * B, len(ids))
    assert blocks.dtype == torch.int8 and blocks.shape[-1] == 68 and tail.shape[3] > 0

    decode_engine = Engine(smollm_fp32, config)
    req = SeqRequest("r", ids + [first.token_id], len(ids), greedy(10), prefix_kv=blocks,
                     prefix_len=len(ids), prefix_tail=tail)
    assert [first.token_id] + run(decode_engine, [req])["r"].tokens == want
    assert torch.equal(decode_engine.export_blocks("r", 0, n), blocks)
    floats = torch.zeros(2, 30, 2, 3, B, 68)  # the right shape, exact KV's dtype
    with pytest.raises(ValueError, match="prefix KV must be torch.int8"):
        decode_engine.check(SeqRequest("x", ids, len(ids), greedy(1), prefix_kv=floats,
                                       prefix_len=2 * B))


def test_quantized_cold_segments_stream_like_resident_quantized_kv(smollm_fp32, prompt_ids):
    ids = (prompt_ids[-1] * 20)[:900]
    params = greedy(12, ignore_eos=True)
    resident = run(Engine(smollm_fp32, EngineConfig(kv_dtype="uint4", prefix_caching=False)),
                   [make_request("a", ids, params)])["a"].tokens
    cold = Engine(smollm_fp32, EngineConfig(kv_dtype="uint4", kv_window=192,
                                            prefix_caching=False), cold_tier=HostColdTier())
    assert run(cold, [make_request("a", ids, params)])["a"].tokens == resident
    assert cold.stats.kv_cold_tokens > 500


def test_quantized_formats_have_their_own_store_namespace():
    ids = list(range(128))
    keys = {d: block_keys(ids, KeyNamespace("fp0", d, 64)) for d in ("float32", "int8", "uint4")}
    assert len({k[0] for k in keys.values()}) == 3  # never the same block
    packed = torch.zeros(30, 2, 3, 64, 36, dtype=torch.uint8)
    key = keys["uint4"][0]
    assert torch.equal(decode(encode(key, packed), key), packed)
    with pytest.raises(CorruptBlock, match="dtype"):
        decode(encode(key, packed.view(torch.int8)), key)


def test_the_rotation_is_orthonormal_and_leaves_attention_unchanged():
    r = rotation(64, torch.float64, torch.device("cpu"))
    assert torch.allclose(r @ r, torch.eye(64, dtype=torch.float64)) and torch.equal(r, r.T)
    assert rotation(80, torch.float32, torch.device("cpu")) is None  # not a power of two
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, n, 64, generator=g, dtype=torch.float64) for n in (2, 9, 9))
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    rotated = torch.nn.functional.scaled_dot_product_attention(q @ r, k @ r, v @ r) @ r
    assert torch.allclose(plain, rotated)
