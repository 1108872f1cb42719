"""relay/queue.py: queues bounded in frames and bytes, and the writer's outbox."""

from __future__ import annotations

from collections import Counter

import pytest
import trio

from relay.protocol import wire
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


def flow_outbox() -> Outbox:
    """Room for 8 frames of 10 bytes; high mark 4 frames, low mark 2; messages of 2 frames."""
    out = Outbox(FrameQueue(8, 1000), FrameQueue(4, 1000))
    out.set_flow(0.5, 0.25)
    return out


def test_pressed_from_the_high_mark_in_frames_or_bytes() -> None:
    out = flow_outbox()
    for _ in range(3):
        out.data.push(bytes(10))
    assert not out.pressed()
    out.data.push(bytes(10))
    assert out.pressed()
    big = Outbox(FrameQueue(100, 100), FrameQueue(4, 1000))
    big.set_flow(0.5, 0.25)
    big.data.push(bytes(50))
    assert big.pressed()


async def test_wait_drained_returns_once_the_writer_took_the_queue_to_the_low_mark(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    out = flow_outbox()
    for _ in range(5):
        out.data.push(bytes(10))
    results: list[bool] = []

    async def producer() -> None:
        results.append(await out.wait_drained(3600))

    nursery.start_soon(producer)
    await trio.testing.wait_all_tasks_blocked()
    out.next_message(20)  # 5 -> 3: still over the low mark
    await trio.testing.wait_all_tasks_blocked()
    assert results == []
    out.next_message(20)  # 3 -> 1
    await trio.testing.wait_all_tasks_blocked()
    assert results == [True]
    assert not out.stuck()


async def test_a_wait_with_no_message_taken_marks_the_outbox_stuck_until_the_writer_moves(
    autojump_clock: trio.abc.Clock,
) -> None:
    out = flow_outbox()
    for _ in range(6):
        out.data.push(bytes(10))
    assert not await out.wait_drained(1.0)
    assert out.stuck()
    out.next_message(20)
    assert not out.stuck()
    # The writer took a message during this wait but not enough: not stuck.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.wait_drained, 1.0)
        await trio.testing.wait_all_tasks_blocked()
        out.next_message(10)
    assert not out.stuck()


async def test_release_wakes_the_waiting_producers(nursery: trio.Nursery) -> None:
    out = flow_outbox()
    for _ in range(6):
        out.data.push(bytes(10))
    woke: list[bool] = []

    async def producer() -> None:
        woke.append(await out.wait_drained(3600))

    for _ in range(3):
        nursery.start_soon(producer)
    await trio.testing.wait_all_tasks_blocked()
    out.data.clear()
    out.release()
    await trio.testing.wait_all_tasks_blocked()
    assert woke == [True, True, True]


def test_on_drop_sees_every_frame_push_drops() -> None:
    seen: list[tuple[bytes, Drop]] = []
    q = FrameQueue(2, 30, budget=ByteBudget(35))
    q.on_drop = lambda frame, why, count: seen.append((frame, why))
    for f in (b"a" * 10, b"b" * 10, b"c" * 10, b"d" * 25):
        q.push(f)
    assert seen == [
        (b"a" * 10, Drop.OLDEST_FOR_FRAMES),
        (b"b" * 10, Drop.OLDEST_FOR_FRAMES),
        (b"c" * 10, Drop.OLDEST_FOR_BYTES),
    ]
    other = FrameQueue(2, 30, budget=q.budget)
    other.on_drop = lambda frame, why, count: seen.append((frame, why))
    assert not other.push(b"e" * 20)
    assert seen[-1] == (b"e" * 20, Drop.NEW_FOR_BUDGET)


# ---- runs: entries of several frames (the relay's runs of packets) ----------


def recv_run(src: bytes, *payloads: bytes) -> bytes:
    """RecvPackets from ``src``, as one run."""
    return b"".join(wire.encode(wire.RecvPacket(src=src, payload=p)) for p in payloads)


A_KEY = bytes(range(32))
B_KEY = bytes(range(32, 64))


def test_a_run_counts_as_its_frames_in_the_bounds_and_is_taken_as_one_entry() -> None:
    out = Outbox(FrameQueue(8, 10_000), FrameQueue(4, 1000))
    out.set_flow(0.5, 0.25)
    run = recv_run(A_KEY, b"x", b"yy", b"zzz")
    assert out.data.push(run, 3)
    assert len(out.data) == 3 and out.data.bytes == len(run)
    assert not out.pressed()
    assert out.data.push(recv_run(B_KEY, b"w"))
    assert out.pressed()  # 4 frames: the high mark, though 2 entries
    assert out.data.statistics().frames == 4
    message, packets = out.next_message(10_000)
    assert (message, packets) == (run + recv_run(B_KEY, b"w"), 4)
    assert len(out.data) == 0 and out.data.bytes == 0


def test_drop_oldest_drops_a_whole_run_and_counts_every_frame_in_it() -> None:
    seen: list[tuple[bytes, Drop, int]] = []
    q = FrameQueue(4, 10_000)
    q.on_drop = lambda frames, why, count: seen.append((frames, why, count))
    run = recv_run(A_KEY, b"1", b"2", b"3")
    assert q.push(run, 3)
    assert q.push(recv_run(B_KEY, b"4"))
    assert q.push(recv_run(B_KEY, b"5"))  # 5 frames: the 3-frame run goes
    assert seen == [(run, Drop.OLDEST_FOR_FRAMES, 3)]
    assert q.drops == Counter({Drop.OLDEST_FOR_FRAMES: 3})
    assert len(q) == 2
    small = FrameQueue(100, 2 * len(run))
    small.on_drop = lambda frames, why, count: seen.append((frames, why, count))
    assert small.push(run, 3)
    assert small.push(run, 3)
    assert small.push(recv_run(B_KEY, b"6"))  # over the byte bound: the oldest run goes
    assert seen[-1] == (run, Drop.OLDEST_FOR_BYTES, 3)
    assert small.drops == Counter({Drop.OLDEST_FOR_BYTES: 3})
    assert len(small) == 4


def test_a_run_keeps_the_shared_budget_exact() -> None:
    budget = ByteBudget(10_000)
    a = FrameQueue(100, 10_000, budget=budget)
    b = FrameQueue(100, 10_000, budget=budget)
    run = recv_run(A_KEY, b"a" * 100, b"b" * 100)
    assert a.push(run, 2) and b.push(run, 2)
    assert budget.used == 2 * len(run)
    chunks: list[bytes] = []
    assert a.take_into(chunks, 10_000) == (len(run), 2)
    assert budget.used == len(run)
    assert b.clear() == 2
    assert budget.used == 0


def test_a_run_the_budget_has_room_for_in_part_goes_in_frame_by_frame() -> None:
    """As a frame-by-frame push would: the frames that fit go in, the rest are refused,
    each one counted and reported."""
    frame = recv_run(A_KEY, b"p" * 20)
    budget = ByteBudget(2 * len(frame) + 1)
    seen: list[tuple[bytes, Drop, int]] = []
    q = FrameQueue(100, 10_000, budget=budget)
    q.on_drop = lambda frames, why, count: seen.append((frames, why, count))
    assert q.push(frame * 3, 3)
    assert len(q) == 2 and budget.used == 2 * len(frame)
    assert q.drops == Counter({Drop.NEW_FOR_BUDGET: 1})
    assert seen == [(frame, Drop.NEW_FOR_BUDGET, 1)]
    full = FrameQueue(100, 10_000, budget=budget)
    assert not full.push(frame * 2, 2)
    assert full.drops == Counter({Drop.NEW_FOR_BUDGET: 2})


def test_a_run_larger_than_the_queue_keeps_its_newest_frames() -> None:
    payloads = [bytes([i]) * 10 for i in range(6)]
    q = FrameQueue(4, 10_000)
    assert q.push(recv_run(A_KEY, *payloads), 6)
    assert len(q) == 4
    assert q.drops == Counter({Drop.OLDEST_FOR_FRAMES: 2})
    assert b"".join(frames(q)) == recv_run(A_KEY, *payloads[2:])
    one = len(recv_run(A_KEY, payloads[0]))
    by_bytes = FrameQueue(100, 3 * one)
    assert by_bytes.push(recv_run(A_KEY, *payloads), 6)
    assert len(by_bytes) == 3 and by_bytes.bytes == 3 * one
    assert by_bytes.drops == Counter({Drop.OLDEST_FOR_BYTES: 3})
