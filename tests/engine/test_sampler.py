"""Each sampling control on hand-built logits, plus position-deterministic seeding."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import (
    SampleRow,
    _top_k_top_p,
    _top_k_top_p_sorted,
    apply_controls,
    filtered_probs,
    prompt_logprobs,
    sample,
    seed_for,
)
from engine.sampling_params import SamplingParams

# probs 0.5, 0.3, 0.15, 0.05 over a 4-token vocabulary
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def row(position: int = 10, token_ids: list[int] | None = None, prompt: int = 0, **kw):
    return SampleRow(SamplingParams(**kw), position, token_ids or [], prompt)


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def draw_many(logits: torch.Tensor, n: int = 400, **kw) -> list[int]:
    rows = [row(position=p, seed=7, **kw) for p in range(n)]
    return [s.token_id for s in sample(logits.expand(n, -1).clone(), rows, gen())]


def test_greedy_takes_argmax():
    assert [s.token_id for s in sample(LOGITS[None], [row(temperature=0.0)], gen())] == [0]


def test_top_k_keeps_k_best():
    probs = filtered_probs(LOGITS[None], [SamplingParams(top_k=2)])[0]
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0, 0]))
    assert set(draw_many(LOGITS, top_k=2)) == {0, 1}


def test_top_p_drops_the_low_tail():
    probs = filtered_probs(LOGITS[None], [SamplingParams(top_p=0.7)])[0]
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0, 0]))
    # top_p below the best token's mass still keeps that token
    probs = filtered_probs(LOGITS[None], [SamplingParams(top_p=0.1)])[0]
    assert torch.allclose(probs, torch.tensor([1.0, 0, 0, 0]))


def test_min_p_is_relative_to_the_best():
    probs = filtered_probs(LOGITS[None], [SamplingParams(min_p=0.2)])[0]  # keep p >= 0.1
    assert torch.allclose(probs, torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)


def test_filters_are_per_row():
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(top_p=0.7, top_k=3)]
    probs = filtered_probs(LOGITS.expand(3, -1), params)
    assert torch.allclose(probs[0], torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(probs[1], PROBS)
    assert torch.allclose(probs[2], torch.tensor([0.625, 0.375, 0, 0]))


def test_presence_frequency_penalties_count_output_only():
    # prompt [1, 3], output [1, 1, 2]
    r = row(token_ids=[1, 3, 1, 1, 2], prompt=2, presence_penalty=1.0, frequency_penalty=0.5)
    out = apply_controls(torch.zeros(1, 4), [r])[0]
    assert out.tolist() == [0.0, -2.0, -1.5, 0.0]


def test_repetition_penalty_covers_prompt_and_output():
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0]])
    r = row(token_ids=[3, 1], prompt=1, repetition_penalty=2.0)
    assert apply_controls(logits, [r])[0].tolist() == [1.0, 1.0, 3.0, -2.0]


def test_logit_bias_and_bans():
    r = row(temperature=0.0, logit_bias={3: 5.0})
    assert sample(LOGITS[None].clone(), [r], gen())[0].token_id == 3
    banned = SampleRow(SamplingParams(temperature=0.0), 0, [], 0, banned=(0, 1))
    assert sample(LOGITS[None].clone(), [banned], gen())[0].token_id == 2


def test_untouched_rows_are_not_copied():
    logits = torch.zeros(2, 4)
    assert apply_controls(logits, [row(), row()]) is logits


def test_seeded_draw_depends_only_on_seed_and_position():
    a = sample(LOGITS[None].clone(), [row(position=5, seed=1)], gen())[0].token_id
    # same (seed, position) in another batch, beside other rows, with another fallback generator
    rows = [row(position=9, seed=3), row(position=5, seed=1), row(position=2)]
    b = sample(LOGITS.expand(3, -1).clone(), rows, torch.Generator().manual_seed(99))
    assert b[1].token_id == a
    assert seed_for(1, 5) == seed_for(1, 5) != seed_for(1, 6)


def test_seeded_draws_follow_the_distribution():
    counts = torch.bincount(torch.tensor(draw_many(LOGITS, n=2000)), minlength=4) / 2000
    assert torch.allclose(counts, PROBS, atol=0.04)


def test_temperature_sharpens():
    cold = torch.bincount(torch.tensor(draw_many(LOGITS, n=600, temperature=0.3)), minlength=4)
    assert cold[0] / 600 > 0.75


def test_logprobs_come_from_the_raw_distribution():
    r = row(temperature=0.0, logit_bias={2: 10.0}, logprobs=2)
    out = sample(LOGITS[None].clone(), [r], gen())[0]
    assert out.token_id == 2
    assert math.isclose(out.logprob, math.log(0.15), rel_tol=1e-5)
    assert [t for t, _ in out.top_logprobs] == [0, 1]
    assert math.isclose(out.top_logprobs[0][1], math.log(0.5), rel_tol=1e-5)


@pytest.mark.parametrize("k", [0, 2])
def test_prompt_logprobs(k):
    logits = torch.stack([LOGITS, LOGITS.flip(0)])  # two positions
    got = prompt_logprobs(logits, [1, 0], k)
    assert math.isclose(got[0][0], math.log(0.3), rel_tol=1e-5)
    assert math.isclose(got[1][0], math.log(0.05), rel_tol=1e-5)
    assert [t for t, _ in got[1][1]] == [3, 2][:k]


def test_nucleus_search_among_candidates_equals_full_sort():
    g = torch.Generator().manual_seed(3)
    # peaked rows settle among the candidates; flat rows (scale 0.1) need the full sort
    scale = torch.tensor([4.0, 4.0, 2.0, 0.1, 0.1, 4.0])[:, None]
    logits = torch.randn(6, 5000, generator=g) * scale
    k = torch.tensor([5000, 50, 5000, 5000, 3000, 2000])
    p = torch.tensor([0.9, 0.8, 0.99, 0.95, 0.5, 1.0])
    fast = _top_k_top_p(logits, k, p)
    full = _top_k_top_p_sorted(logits, k, p)
    assert torch.equal(fast.isfinite(), full.isfinite())
    kept = fast.isfinite().sum(dim=-1)
    assert kept[1] <= 50 and kept[3] > 1024 and kept[5] == 2000  # both paths really ran
