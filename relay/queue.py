"""Bounded frame queues and the batching writer's outbox, shared by relay and client.

Theory of operation
-------------------
Every connection, at the relay and in a client, has one writer task that
sends everything queued as one WebSocket message: coalescing is what makes
small packets cheap (the WebSocket layer's cost is paid once per message).
What it sends waits in an :class:`Outbox`: a small queue of control frames
(pong, peer gone, health) that always goes first, and a queue of data frames.

A :class:`FrameQueue` is bounded twice: in frames and in bytes (so 512
queued 64 KiB packets cannot pin 32 MiB). Queues may also share a
:class:`ByteBudget`, a bound on the bytes queued by all of them together (the
relay's total). An entry of a queue is one frame or a run of consecutive
frames pushed together (the relay queues a run of packets for one receiver as
one entry, copied once: ``push(frames_bytes, count)``); the bounds, the
flow-control marks, the drop counters and what the writer reports count
frames, never entries. A producer picks what a full queue does:

- :meth:`FrameQueue.push` drops the **oldest** entries until the new one fits
  (a relay's queue towards a receiver: new packets matter more than stale
  ones), counting every frame they held; when the shared budget has no room,
  the new frames are refused. Every drop is counted by :class:`Drop` in a
  Counter the owner gives the queue. A run that cannot go in whole (more
  frames or bytes than the queue's bounds, or than the budget has room for)
  goes in frame by frame, so it loses exactly the frames a frame-by-frame
  push would;
- :meth:`FrameQueue.offer` refuses the **new** frame (a client's send queue,
  whose callers wait for room; a mesh link's queue; a relay's control queue),
  and the caller counts or waits.

Nothing here blocks or awaits except :meth:`Outbox.wait` (the writer) and
:meth:`Outbox.wait_drained` (producers, for flow control).

Flow control: an outbox given a high- and a low-water mark (:meth:`Outbox.set_flow`)
tells producers when to stop: :meth:`Outbox.pressed` is true while its data
queue is at or over the high mark (in frames or in bytes), and a producer
that sees it waits in :meth:`Outbox.wait_drained` until the writer has taken
the queue down to the low mark, for a bounded time. The writer counts every
message it takes (``taken``): a wait that ends with no message taken means
the writer is stuck (its socket accepts nothing), and the outbox is marked
:meth:`stuck` until the writer takes another message, so that producers stop
waiting on it and fall back to the queue's counted drops.

:meth:`Outbox.next_message` takes what one message carries: control frames
first, then data, never more than ``max_bytes`` unless a single entry is larger
on its own (then it goes alone: producers keep runs within a message's size,
so only a single large frame does).
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from relay.protocol.wire import FRAME_HEADER, HEADER_BYTES

__all__ = [
    "ByteBudget",
    "Drop",
    "FrameQueue",
    "Outbox",
    "OutboxStatistics",
    "QueueStatistics",
]


class Drop(enum.Enum):
    """Why a queue dropped frames; counted, per frame, in the ``drops`` Counter a queue
    is given."""

    #: The queue held its maximum number of frames: its oldest entries were dropped
    #: until the new one fit.
    OLDEST_FOR_FRAMES = "oldest_for_frames"
    #: The queue held its maximum bytes: its oldest entries were dropped until the new
    #: one fit.
    OLDEST_FOR_BYTES = "oldest_for_bytes"
    #: The shared budget had no room: the new frame was refused.
    NEW_FOR_BUDGET = "new_for_budget"


class ByteBudget:
    """Bytes queued by several queues together, against one limit."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("a byte budget must be positive")
        self.limit = limit
        self.used = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueStatistics:
    frames: int
    bytes: int
    max_frames: int
    max_bytes: int


#: The entries of every queue that has never held one.
_NO_ENTRIES: tuple[()] = ()


class FrameQueue:
    """A FIFO of frames bounded in frames and in bytes (and, optionally, by a shared budget).

    Each entry holds one frame or a run of frames pushed together; the bounds
    count frames. A single entry larger than ``max_bytes`` is still taken into
    an empty queue: the bound is on what waits, and a frame cannot be split.
    Frames that :meth:`push` drops are counted in ``drops`` (a Counter that
    several queues may share), and each dropped entry is handed to ``on_drop``,
    with how many frames it held, if one is set (to tell whose frames they were).
    """

    __slots__ = (
        "_entries",
        "budget",
        "bytes",
        "drops",
        "frames",
        "max_bytes",
        "max_frames",
        "on_drop",
    )

    def __init__(
        self,
        max_frames: int,
        max_bytes: int,
        *,
        budget: ByteBudget | None = None,
        drops: Counter[Drop] | None = None,
    ) -> None:
        if max_frames < 1 or max_bytes < 1:
            raise ValueError("a queue must hold at least one frame and one byte")
        # An idle connection's queues hold nothing: they share one empty tuple until
        # their first entry (an empty deque costs 760 bytes, per queue, per client).
        # An entry is (bytes, how many frames they are).
        self._entries: deque[tuple[bytes, int]] = _NO_ENTRIES  # type: ignore[assignment]
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.budget = budget
        self.drops: Counter[Drop] = drops if drops is not None else Counter()
        #: Called with each entry push() drops, why, and how many frames it held
        #: (only on drops: off the hot path).
        self.on_drop: Callable[[bytes, Drop, int], None] | None = None
        #: Frames and bytes queued now.
        self.frames = 0
        self.bytes = 0

    def __len__(self) -> int:
        """Frames queued (an entry may hold several)."""
        return self.frames

    def __bool__(self) -> bool:
        return bool(self._entries)

    def popleft(self) -> bytes:
        """The oldest entry's bytes: one frame, or the run of frames pushed together."""
        return self._pop()[0]

    def _pop(self) -> tuple[bytes, int]:
        entry = self._entries.popleft()
        n = len(entry[0])
        self.bytes -= n
        self.frames -= entry[1]
        if self.budget is not None:
            self.budget.used -= n
        return entry

    def push(self, data: bytes, frames: int = 1) -> bool:
        """Queue ``data`` (``frames`` whole frames) as one entry, dropping the oldest
        entries while it does not fit.

        False if the shared budget has no room for any of it even so (nothing queued,
        every frame counted as :attr:`Drop.NEW_FOR_BUDGET`).
        """
        n = len(data)
        budget = self.budget
        # The common case first, in one test: this runs for every run of packets a relay routes.
        if (
            self.frames + frames <= self.max_frames
            and self.bytes + n <= self.max_bytes
            and (budget is None or budget.used + n <= budget.limit)
        ):
            try:
                self._entries.append((data, frames))
            except AttributeError:  # the first entry: still the shared empty tuple
                self._entries = deque(((data, frames),))
            self.frames += frames
            self.bytes += n
            if budget is not None:
                budget.used += n
            return True
        return self._push_dropping(data, n, frames)

    def _push_dropping(self, data: bytes, n: int, frames: int) -> bool:
        if frames > 1 and (frames > self.max_frames or n > self.max_bytes):
            return self._push_each(data)
        q = self._entries
        on_drop = self.on_drop
        dropped = 0
        while q and self.frames + frames > self.max_frames:
            old, count = self._pop()
            dropped += count
            if on_drop is not None:
                on_drop(old, Drop.OLDEST_FOR_FRAMES, count)
        if dropped:
            self.drops[Drop.OLDEST_FOR_FRAMES] += dropped
        dropped = 0
        while q and self.bytes + n > self.max_bytes:
            old, count = self._pop()
            dropped += count
            if on_drop is not None:
                on_drop(old, Drop.OLDEST_FOR_BYTES, count)
        if dropped:
            self.drops[Drop.OLDEST_FOR_BYTES] += dropped
        budget = self.budget
        if budget is not None:
            if budget.used + n > budget.limit:
                if frames > 1:
                    return self._push_each(data)
                self.drops[Drop.NEW_FOR_BUDGET] += 1
                if on_drop is not None:
                    on_drop(data, Drop.NEW_FOR_BUDGET, 1)
                return False
            budget.used += n
        self._append(data, frames)
        self.bytes += n
        return True

    def _push_each(self, data: bytes) -> bool:
        """A run that cannot go in whole goes in frame by frame: the frames a frame-by-frame
        push would have dropped or refused are, and no more. Whether any went in."""
        unpack = FRAME_HEADER.unpack_from
        queued = False
        pos = 0
        while pos < len(data):
            _, length = unpack(data, pos)
            stop = pos + HEADER_BYTES + length
            queued = self.push(data[pos:stop]) or queued
            pos = stop
        return queued

    def _append(self, data: bytes, frames: int) -> None:
        try:
            self._entries.append((data, frames))
        except AttributeError:  # the first entry: still the shared empty tuple
            self._entries = deque(((data, frames),))
        self.frames += frames

    def offer(self, frame: bytes) -> bool:
        """Queue ``frame`` if it fits; False (nothing queued, nothing counted) if not."""
        if not self.has_room(len(frame)):
            return False
        self.append_unchecked(frame)
        return True

    def has_room(self, n: int) -> bool:
        """Whether a frame of ``n`` bytes fits now (any frame fits an empty queue)."""
        if self._entries and (self.frames >= self.max_frames or self.bytes + n > self.max_bytes):
            return False
        budget = self.budget
        return budget is None or budget.used + n <= budget.limit

    def append_unchecked(self, frame: bytes) -> None:
        """Queue ``frame`` without looking at the bounds: the caller checked ``has_room``."""
        n = len(frame)
        self._append(frame, 1)
        self.bytes += n
        if self.budget is not None:
            self.budget.used += n

    def take_into(
        self, chunks: list[bytes], room: int, *, at_least_one: bool = False
    ) -> tuple[int, int]:
        """Move the oldest entries that fit in ``room`` bytes to ``chunks``; the bytes and
        the frames moved.

        With ``at_least_one`` the first entry is moved even if it alone is larger.
        """
        q = self._entries
        taken = frames = 0
        if at_least_one and q:
            data, frames = q.popleft()
            chunks.append(data)
            taken = len(data)
        while q and taken + len(q[0][0]) <= room:
            data, count = q.popleft()
            chunks.append(data)
            taken += len(data)
            frames += count
        if frames:
            self.frames -= frames
            self.bytes -= taken
            if self.budget is not None:
                self.budget.used -= taken
        return taken, frames

    def clear(self) -> int:
        """Empty the queue; how many frames it held."""
        n = self.frames
        if self.budget is not None:
            self.budget.used -= self.bytes
        if self._entries:
            self._entries.clear()
        self.frames = 0
        self.bytes = 0
        return n

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            frames=self.frames,
            bytes=self.bytes,
            max_frames=self.max_frames,
            max_bytes=self.max_bytes,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxStatistics:
    data: QueueStatistics
    control: QueueStatistics


class Outbox:
    """What one connection's writer sends: control frames first, then data.

    Producers queue with ``control.offer`` / ``data.push`` / ``data.offer`` and
    then call :meth:`poke`; the writer alone calls :meth:`wait` and
    :meth:`next_message`.
    """

    __slots__ = (
        "_drained",
        "_shared_skip",
        "_stuck_at",
        "_waiting",
        "_wake",
        "control",
        "data",
        "high_bytes",
        "high_frames",
        "low_bytes",
        "low_frames",
        "taken",
    )

    def __init__(self, data: FrameQueue, control: FrameQueue) -> None:
        self.data = data
        self.control = control
        self._wake = trio.Event()
        self._waiting = False
        # Flow control (see set_flow): off until set, the marks above any queue's bounds.
        self.high_frames = self.low_frames = data.max_frames + 1
        self.high_bytes = self.low_bytes = data.max_bytes + 1
        #: Messages the writer has taken so far (its progress).
        self.taken = 0
        self._stuck_at = -1
        # A shared reader (a mesh link's) waited a whole wait here without the queue
        # draining: shared readers pass this queue by until it is down to the low mark.
        self._shared_skip = False
        #: Set when the data queue is down to the low mark (or cleared); producers wait on it.
        self._drained: trio.Event | None = None

    def set_flow(self, high: float, low: float) -> None:
        """Flow-control marks as fractions of the data queue's bounds (0 < low <= high <= 1)."""
        if not 0 < low <= high <= 1:
            raise ValueError("flow marks must satisfy 0 < low <= high <= 1")
        data = self.data
        self.high_frames = max(1, int(data.max_frames * high))
        self.high_bytes = max(1, int(data.max_bytes * high))
        self.low_frames = max(0, int(data.max_frames * low))
        self.low_bytes = max(0, int(data.max_bytes * low))

    def pressed(self) -> bool:
        """Whether the data queue is at or over the high mark, in frames or in bytes."""
        data = self.data
        return data.frames >= self.high_frames or data.bytes >= self.high_bytes

    def stuck(self) -> bool:
        """A producer's wait saw the writer take nothing, and it has taken nothing since."""
        return self.taken == self._stuck_at

    def skipped_by_shared(self) -> bool:
        """A shared reader's wait here timed out, and the queue has not drained since:
        one slow receiver must not set the pace of a mesh link that carries everyone's
        packets, so shared readers wait on it at most one wait per drain."""
        return self._shared_skip

    def _below_low(self) -> bool:
        data = self.data
        return data.frames <= self.low_frames and data.bytes <= self.low_bytes

    def release(self) -> None:
        """Wake every producer waiting in :meth:`wait_drained` (the queue was cleared)."""
        self._shared_skip = False
        drained = self._drained
        if drained is not None:
            self._drained = None
            drained.set()

    async def wait_drained(self, timeout_s: float, *, shared: bool = False) -> bool:
        """Until the writer took the data queue down to the low mark, at most ``timeout_s``.

        True if it did (or the wait was released). False if it did not: then, if
        the writer took no message at all meanwhile, the outbox is marked stuck;
        and if the waiter is ``shared`` (a mesh link's reader), shared readers pass
        it by until it drains (:meth:`skipped_by_shared`).
        """
        if self._below_low():
            return True
        if self._drained is None:
            self._drained = trio.Event()
        drained = self._drained
        taken = self.taken
        with trio.move_on_after(timeout_s):
            await drained.wait()
            return True
        if self.taken == taken:
            self._stuck_at = taken
        if shared:
            self._shared_skip = True
        return False

    def __bool__(self) -> bool:
        return bool(self.data) or bool(self.control)

    def poke(self) -> None:
        """Wake the writer if it waits (something was queued)."""
        if self._waiting:
            self._waiting = False
            self._wake.set()

    async def wait(self, timeout_s: float) -> bool:
        """Until something is queued or ``timeout_s`` passed; whether anything is queued."""
        if not self:
            self._wake = trio.Event()
            self._waiting = True
            with trio.move_on_after(timeout_s):
                await self._wake.wait()
            self._waiting = False
        return bool(self)

    def next_message(self, max_bytes: int) -> tuple[bytes, int]:
        """One message's worth of queued frames, and how many of them are data frames.

        The message never exceeds ``max_bytes`` unless its first entry alone does.
        The outbox must not be empty.
        """
        chunks: list[bytes] = []
        ctrl = self.control
        if ctrl:
            size, _ = ctrl.take_into(chunks, max_bytes, at_least_one=True)
            _, packets = self.data.take_into(chunks, max_bytes - size)
        else:
            _, packets = self.data.take_into(chunks, max_bytes, at_least_one=True)
        self.taken += 1
        if (self._drained is not None or self._shared_skip) and self._below_low():
            self.release()
        # One entry (a run for one receiver, the common case) is sent as it is: join
        # returns a lone bytes object without copying it.
        return b"".join(chunks), packets

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(data=self.data.statistics(), control=self.control.statistics())
