"""Attention in parts merged by log-sum-exp equals attention over all the keys at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.split_attention import attend_part, merge
from engine.step_plan import chunk_mask

HQ, H, D = 9, 3, 64


def _qkv(tq: int, tk: int, dtype=torch.float32, b: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, HQ, tq, D, generator=g).to(dtype)
    k = torch.randn(b, H, tk, D, generator=g).to(dtype)
    v = torch.randn(b, H, tk, D, generator=g).to(dtype)
    return q, k, v


def _reference(q, k, v, mask=None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          scale=D ** -0.5, enable_gqa=True)


@pytest.mark.parametrize("cuts", [[], [1], [100, 101], [7, 64, 500, 1999]])
def test_decode_over_parts_equals_one_pass(cuts):
    q, k, v = _qkv(1, 2000, b=2)
    bounds = [0, *cuts, 2000]
    parts = [attend_part(q, k[:, :, a:b], v[:, :, a:b], D ** -0.5)
             for a, b in zip(bounds, bounds[1:], strict=False)]
    got = merge(parts)
    assert torch.allclose(got.out, _reference(q, k, v), atol=1e-5, rtol=0)
    assert torch.isfinite(got.lse).all()


def test_causal_prefill_over_parts_with_queries_that_see_none_of_a_part():
    """A chunk of 32 queries at positions 96..127 over keys 0..127 in parts [0, 50), [50, 110),
    [110, 128): the first queries see nothing of the last part (a fully masked row there)."""
    start, t = 96, 32
    q, k, v = _qkv(t, start + t)
    mask = chunk_mask(start, t, torch.float32, torch.device("cpu"))  # [1, 1, t, start + t]
    parts = [attend_part(q, k[:, :, a:b], v[:, :, a:b], D ** -0.5, mask[..., a:b])
             for a, b in ((0, 50), (50, 110), (110, 128))]
    # the query at 96 sees none of 110..127: the engine's masks are finfo.min, not -inf, so
    # that part's lse is ~-3e38 and it weighs exp(-3e38) = 0 in the merge
    assert (parts[2].lse[0, :, 0] < -1e30).all()
    got = merge(parts)
    assert torch.allclose(got.out, _reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_bf16_parts_merge_as_accurately_as_one_bf16_pass():
    """Each part's output is rounded to bf16 (the CPU kernel's), the merge is fp32: the error
    against fp32 attention stays within that of SDPA over all the keys in bf16."""
    q, k, v = _qkv(1, 600, torch.bfloat16)
    got = merge([attend_part(q, k[:, :, :300], v[:, :, :300], D ** -0.5),
                 attend_part(q, k[:, :, 300:], v[:, :, 300:], D ** -0.5)])
    assert got.out.dtype == torch.float32
    exact = _reference(q, k, v)
    one_pass = F.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, enable_gqa=True)
    bound = (one_pass.float() - exact).abs().max().item()
    assert (got.out - exact).abs().max().item() <= 2 * bound


def test_a_merge_of_nothing_seen_is_zero_not_nan():
    q, k, v = _qkv(1, 8)
    blind = torch.full((1, 1, 1, 8), float("-inf"))
    got = merge([attend_part(q, k, v, D ** -0.5, blind)] * 2)
    assert torch.equal(got.out, torch.zeros_like(got.out)) and torch.isneginf(got.lse).all()


@pytest.mark.parametrize("tq", [1, 40])
def test_a_causal_part_equals_a_masked_one(tq):
    """A chunk's own keys (causal) through the CPU flash kernel, and through the matmul form
    under the equivalent mask."""
    q, k, v = _qkv(tq, tq)
    mask = chunk_mask(0, tq, torch.float32, torch.device("cpu"))
    got = attend_part(q, k, v, D ** -0.5, causal=True)
    want = attend_part(q, k, v, D ** -0.5, mask)
    assert torch.allclose(got.out, want.out, atol=1e-5, rtol=0)
    assert torch.allclose(got.lse, want.lse, atol=1e-5, rtol=0)
    assert torch.allclose(got.out, _reference(q, k, v, mask), atol=1e-5, rtol=0)
