"""relay/queue.py: queues bounded in frames and bytes, and the writer's outbox."""

from __future__ import annotations

from collections import Counter

import pytest
import trio

from relay.queue import ByteBudget, Drop, FrameQueue, Outbox


def frames(q: FrameQueue) -> list[bytes]:
    out = []
    while q:
        out.append(q.popleft())
    return out


def test_push_drops_the_oldest_for_the_frame_bound() -> None:
    q = FrameQueue(2, 1000)
    for f in (b"a", b"b", b"c"):
        assert q.push(f)
    assert q.drops == Counter({Drop.OLDEST_FOR_FRAMES: 1})
    assert q.bytes == 2
    assert frames(q) == [b"b", b"c"]
    assert q.bytes == 0


def test_push_drops_the_oldest_until_the_new_frame_fits_the_byte_bound() -> None:
    q = FrameQueue(100, 10)
    for f in (b"1234", b"5678", b"9"):
        q.push(f)
    assert q.push(b"abcdefgh")  # 8 bytes: both 4-byte frames must go
    assert q.drops == Counter({Drop.OLDEST_FOR_BYTES: 2})
    assert frames(q) == [b"9", b"abcdefgh"]


def test_a_frame_larger_than_the_byte_bound_still_fits_an_empty_queue() -> None:
    q = FrameQueue(100, 10)
    q.push(b"12345")
    assert q.push(bytes(50))
    assert q.bytes == 50 and len(q) == 1


def test_a_shared_budget_refuses_new_frames_and_counts_them() -> None:
    budget = ByteBudget(10)
    drops: Counter[Drop] = Counter()
    a = FrameQueue(100, 100, budget=budget, drops=drops)
    b = FrameQueue(100, 100, budget=budget, drops=drops)
    assert a.push(bytes(6))
    assert not b.push(bytes(6))
    assert b.push(bytes(4))
    assert budget.used == 10
    assert drops == Counter({Drop.NEW_FOR_BUDGET: 1})
    a.popleft()
    assert budget.used == 4
    assert b.clear() == 1
    assert budget.used == 0


def test_offer_refuses_what_does_not_fit_and_counts_nothing() -> None:
    q = FrameQueue(2, 10)
    assert q.offer(b"12345")
    assert not q.offer(b"123456")
    assert q.offer(b"12345")
    assert not q.offer(b"1")
    assert q.drops == Counter()
    assert q.statistics().frames == 2 and q.statistics().bytes == 10


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FrameQueue(0, 10)
    with pytest.raises(ValueError):
        ByteBudget(0)


@pytest.mark.parametrize("max_bytes", [1, 7, 10, 64, 1000])
def test_messages_never_exceed_max_bytes_unless_one_frame_does(max_bytes: int) -> None:
    out = Outbox(FrameQueue(1000, 10**6), FrameQueue(1000, 10**6))
    sizes = [3, 5, 1, 9, 20, 2, 2, 2, 7, 64, 1]
    for i, n in enumerate(sizes):
        (out.control if i % 3 == 0 else out.data).push(bytes([i]) * n)
    seen = []
    data_frames = 0
    while out:
        message, packets = out.next_message(max_bytes)
        assert len(message) <= max_bytes or len(set(message)) == 1
        seen.append(message)
        data_frames += packets
    assert data_frames == sum(1 for i in range(len(sizes)) if i % 3)
    assert sum(len(m) for m in seen) == sum(sizes)


def test_control_frames_go_first() -> None:
    out = Outbox(FrameQueue(10, 100), FrameQueue(10, 100))
    out.data.push(b"d1")
    out.control.push(b"c1")
    out.data.push(b"d2")
    assert out.next_message(100) == (b"c1d1d2", 2)


async def test_wait_returns_when_something_is_queued(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = Outbox(FrameQueue(10, 100), FrameQueue(10, 100))
    assert not await out.wait(5.0)  # nothing: the timeout
    async with trio.open_nursery() as nursery:

        async def producer() -> None:
            await trio.sleep(1.0)
            out.data.push(b"x")
            out.poke()

        nursery.start_soon(producer)
        with trio.fail_after(2.0):
            assert await out.wait(30.0)
