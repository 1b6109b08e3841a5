"""Seeded plans: reproducible, bounded, and shaped as each workload promises."""

from __future__ import annotations

import random
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from tandem.bench.workloads import (
    WORDS,
    Conversation,
    arrival_delays,
    build_plan,
    plan_size,
    render_prompt,
    sample_len,
)
from tests.bench.helpers import make_config


def texts(plan) -> list[tuple]:
    return [(s.prefix, t.index, t.text, t.max_tokens) for s in plan for t in s.turns]


def test_same_seed_same_prompts_different_seed_different():
    for workload in ("random", "shared-prefix", "multi-turn"):
        cfg = make_config(workload=workload, range_ratio=0.5, seed=7)
        assert texts(build_plan(cfg)) == texts(build_plan(make_config(
            workload=workload, range_ratio=0.5, seed=7)))
        assert texts(build_plan(cfg)) != texts(build_plan(make_config(
            workload=workload, range_ratio=0.5, seed=8)))


def test_random_plan_lengths_follow_range_ratio():
    cfg = make_config(num_requests=50, input_len=100, output_len=20, range_ratio=0.5)
    plan = build_plan(cfg)
    assert plan_size(plan) == 50
    lens = [len(t.text.split()) for s in plan for t in s.turns]
    assert min(lens) >= 50 and max(lens) <= 150 and len(set(lens)) > 1
    assert all(10 <= t.max_tokens <= 30 for s in plan for t in s.turns)
    assert all(w in WORDS for s in plan for t in s.turns for w in t.text.split())


def test_max_tokens_overrides_output_len_without_changing_prompts():
    plain = build_plan(make_config(range_ratio=0.5))
    fixed = build_plan(make_config(range_ratio=0.5, max_tokens=3))
    assert [t.text for s in plain for t in s.turns] == [t.text for s in fixed for t in s.turns]
    assert {t.max_tokens for s in fixed for t in s.turns} == {3}


def test_shared_prefix_plan_is_users_by_turns_cut_turn_major():
    plan = build_plan(make_config(workload="shared-prefix", num_users=3, turns=4,
                                  num_requests=7, prefix_len=20))
    # indices 0-2 are turn 0 of users 0-2, 3-5 turn 1, 6 is user 0's turn 2
    assert [[t.index for t in s.turns] for s in plan] == [[0, 3, 6], [1, 4], [2, 5]]
    prefixes = [s.prefix for s in plan]
    assert len(set(prefixes)) == 3 and all(len(p.split()) == 22 for p in prefixes)
    assert not any(s.carry_history for s in plan)


def test_multi_turn_conversation_carries_answers():
    (session, *_) = build_plan(make_config(workload="multi-turn", prefix_len=0))
    assert session.carry_history and session.prefix is None
    convo = Conversation.start(session)
    first, second = session.turns[:2]
    convo.record_turn(first.text, "the answer")
    messages = convo.with_question(second.text)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == "the answer"
    assert render_prompt(messages).endswith(f"User: {second.text}\n\nAssistant:")


def test_arrival_delays_are_seeded_poisson():
    assert arrival_delays(3, None, 0) == [0.0, 0.0, 0.0]
    a, b = arrival_delays(2000, 10.0, 1), arrival_delays(2000, 10.0, 1)
    assert a == b and a != arrival_delays(2000, 10.0, 2)
    assert a[0] == 0.0 and all(x < y for x, y in pairwise(a))
    mean_gap = a[-1] / (len(a) - 1)
    assert 0.09 < mean_gap < 0.11  # 1/rate, within sampling noise for 2000 arrivals


@given(mean=st.integers(1, 5000), ratio=st.floats(0.0, 0.99), seed=st.integers(0, 2**32))
def test_sample_len_stays_in_range(mean, ratio, seed):
    n = sample_len(random.Random(seed), mean, ratio)
    assert max(1, int(mean * (1 - ratio))) <= n <= max(1, int(mean * (1 + ratio)))
