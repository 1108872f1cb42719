"""Supervisor: restart with capped, jittered backoff; a failure at start is the caller's."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relay.supervisor import Supervisor


class Flaky:
    """A component that fails ``failures`` times once started, then runs for ever."""

    def __init__(self, failures: int, *, fail_before_started: frozenset[int] = frozenset()) -> None:
        self.failures = failures
        self.fail_before_started = fail_before_started
        self.starts: list[float] = []

    async def __call__(self, *, task_status: trio.TaskStatus[int]) -> None:
        run = len(self.starts)
        self.starts.append(trio.current_time())
        if run in self.fail_before_started:
            raise OSError(98, "Address already in use")
        task_status.started(run)
        await trio.sleep(1e-3)
        if run < self.failures:
            raise RuntimeError(f"failure {run}")
        await trio.sleep_forever()


async def test_restarts_back_off_exponentially_up_to_the_cap(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup = Supervisor(initial_s=0.1, max_s=0.8)
    comp = Flaky(8)
    assert await sup.start(nursery, "flaky", comp) == 0
    await trio.sleep(60)
    assert len(comp.starts) == 9
    gaps = [b - a - 1e-3 for a, b in zip(comp.starts, comp.starts[1:], strict=False)]
    caps = [0.1, 0.2, 0.4, 0.8, 0.8, 0.8, 0.8, 0.8]
    for gap, cap in zip(gaps, caps, strict=True):
        assert cap / 2 - 1e-9 <= gap <= cap + 1e-9
    stats = sup.statistics()
    assert stats.restarts == {"flaky": 8}
    assert stats.running == ("flaky",)
    assert stats.last_failure == {"flaky": "RuntimeError: failure 7"}


async def test_backoff_starts_over_after_a_stable_run(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup = Supervisor(initial_s=0.1, max_s=10, stable_s=5)
    runs: list[float] = []

    async def component(*, task_status: trio.TaskStatus[None]) -> None:
        runs.append(trio.current_time())
        task_status.started()
        # Three quick failures, one long run, then another failure.
        await trio.sleep(6 if len(runs) == 4 else 1e-3)
        if len(runs) <= 5:
            raise RuntimeError("boom")
        await trio.sleep_forever()

    await sup.start(nursery, "c", component)
    await trio.sleep(30)
    assert len(runs) == 6
    assert runs[5] - runs[4] - 6 <= 0.1  # the first step again, not 0.8
    assert sup.statistics().restarts == {"c": 5}


async def test_a_failure_before_the_first_start_is_raised_not_retried(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup = Supervisor()
    comp = Flaky(0, fail_before_started=frozenset({0}))
    with pytest.raises(OSError, match="in use"):
        await sup.start(nursery, "listener", comp)
    await trio.sleep(60)
    assert len(comp.starts) == 1
    assert sup.statistics().restarts == {}


async def test_a_restart_that_cannot_start_is_retried(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup = Supervisor()
    comp = Flaky(1, fail_before_started=frozenset({1, 2}))
    await sup.start(nursery, "listener", comp)
    await trio.sleep(60)
    assert len(comp.starts) == 4
    stats = sup.statistics()
    assert stats.restarts == {"listener": 3}
    assert stats.running == ("listener",)


async def test_cancelling_is_not_a_failure(autojump_clock: trio.testing.MockClock) -> None:
    sup = Supervisor()
    comp = Flaky(0)
    async with trio.open_nursery() as nursery:
        await sup.start(nursery, "c", comp)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(comp.starts) == 1
    assert sup.statistics().restarts == {}
    assert sup.statistics().running == ()
