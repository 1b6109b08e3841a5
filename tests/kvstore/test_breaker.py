"""The circuit breaker the store tiers (threshold 1) and the router's workers (threshold 3) share,
driven by a fake clock."""

from __future__ import annotations

import threading

import pytest

from kvstore.breaker import Breaker
from tests.kvstore.helpers import FakeClock


def make_breaker(clock: FakeClock, threshold: int = 1, changes: list | None = None) -> Breaker:
    on_change = changes.append if changes is not None else None
    return Breaker("t", 0.5, 4.0, clock, threshold=threshold, on_change=on_change)


@pytest.mark.parametrize("threshold", [1, 3])
def test_opens_after_threshold_consecutive_failures(clock, threshold):
    b = make_breaker(clock, threshold)
    for _ in range(threshold - 1):
        b.failed(OSError("x"))
        assert b.up and b.allow()
    b.failed(OSError("x"))
    assert not b.up and b.state() == "open" and not b.allow()
    assert b.consecutive == threshold and b.failures == threshold and b.opened_total == 1


def test_a_success_breaks_the_streak(clock):
    b = make_breaker(clock, threshold=3)
    b.failed()
    b.failed()
    b.succeeded()
    b.failed()
    b.failed()
    assert b.state() == "closed" and b.consecutive == 2 and b.failures == 4


def fail_trial(b: Breaker, clock: FakeClock) -> float:
    """Wait out the cooldown, fail the trial; the length of the cooldown waited (s)."""
    waited = 0.0
    while not b.allow():
        clock.advance(0.25)
        waited += 0.25
    b.failed()
    return waited


def test_cooldown_doubles_per_failed_trial_up_to_max(clock):
    b = make_breaker(clock)
    b.failed()
    assert [fail_trial(b, clock) for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.opened_total == 6


def test_failures_while_open_do_not_extend_the_cooldown(clock):
    b = make_breaker(clock)
    b.failed()
    clock.advance(0.25)
    b.failed()  # a call that began before the breaker opened
    clock.advance(0.25)
    assert b.state() == "half_open" and b.opened_total == 1


def test_half_open_lets_one_trial_at_a_time(clock):
    b = make_breaker(clock)
    b.failed()
    clock.advance(0.5)
    assert b.state() == "half_open" and b.available()
    assert b.allow()
    assert not b.available() and not b.allow() and not b.allow()
    assert b.state() == "half_open"
    b.end_trial()  # the trial ended without a verdict
    assert b.allow() and not b.allow()


def test_a_trial_that_never_reports_lapses(clock):
    b = make_breaker(clock)
    b.failed()
    clock.advance(0.5)
    assert b.allow()  # this caller dies without reporting
    clock.advance(0.75)
    assert not b.allow()
    clock.advance(0.25)  # one cooldown (the doubled one, 1 s) after the trial began
    assert b.allow() and not b.allow()


def test_success_closes_and_resets_the_cooldown(clock):
    b = make_breaker(clock)
    b.failed()
    fail_trial(b, clock)
    fail_trial(b, clock)
    clock.advance(2.0)
    assert b.allow()
    b.succeeded()
    assert b.up and b.state() == "closed" and b.consecutive == 0 and b.allow()
    b.failed()
    assert fail_trial(b, clock) == 0.5


def test_reset_forgets_the_past(clock):
    b = make_breaker(clock, threshold=3)
    for _ in range(3):
        b.failed()
    b.reset()
    assert b.state() == "closed" and b.consecutive == 0 and b.failures == 3


def test_listener_fires_only_on_changes(clock):
    changes = []
    b = make_breaker(clock, threshold=2, changes=changes)
    b.succeeded()
    b.failed()
    assert changes == []
    b.failed()
    b.failed()  # while open
    fail_trial(b, clock)  # open -> half_open -> open: still down
    assert changes == [False]
    clock.advance(1.0)
    assert b.allow()
    b.succeeded()
    b.succeeded()
    assert changes == [False, True]


def test_listener_errors_are_swallowed(clock):
    b = Breaker("t", clock=clock, on_change=lambda up: 1 / 0)
    b.failed()
    assert not b.up


def test_many_threads_leave_a_consistent_state(clock):
    changes = []
    b = make_breaker(clock, threshold=3, changes=changes)
    rounds, n_threads = 500, 8
    allowed = []

    def hammer(i: int) -> None:
        for j in range(rounds):
            if b.allow():
                allowed.append(i)
            if (i + j) % 3:
                b.failed()
            else:
                b.succeeded()
            clock.advance(0.01)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n_failed = sum(1 for i in range(n_threads) for j in range(rounds) if (i + j) % 3)
    assert b.failures == n_failed and allowed
    assert changes[:1] == [False]  # then strictly up, down, up, ...
    assert all(a != c for a, c in zip(changes, changes[1:], strict=False))
    assert b.state() in ("closed", "open", "half_open")
    assert changes[-1] == b.up
    b.succeeded()
    assert b.state() == "closed" and b.allow()
