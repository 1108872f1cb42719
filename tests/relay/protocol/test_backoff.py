"""The one retry schedule: jittered in [c/2, c], c doubling to the cap, reset starts over."""

from __future__ import annotations

import random

from relay.protocol.backoff import Backoff


def test_each_delay_is_in_half_to_full_cap_and_the_cap_doubles_to_max() -> None:
    random.seed(1)
    backoff = Backoff(0.1, 1.0)
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    for cap in caps:
        delay = backoff.next()
        assert cap / 2 <= delay <= cap
    # jittered: many draws of one step are not all the same
    assert len({backoff.delay(3) for _ in range(20)}) > 1


def test_reset_starts_over_and_delay_follows_the_callers_count() -> None:
    backoff = Backoff(0.05, 5.0)
    for _ in range(10):
        backoff.next()
    assert backoff.next() > 2.5  # at the cap: at least half of it
    backoff.reset()
    assert backoff.next() <= 0.05
    assert 0.2 <= backoff.delay(3) <= 0.4
    # a huge count is still the cap, not an overflow
    assert 2.5 <= backoff.delay(10_000) <= 5.0
