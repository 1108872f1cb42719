"""Presence: which clients are connected here, from the data plane to the shared state.

The relay server reports each client's connect and disconnect with
:meth:`PresenceQueue.put_nowait`, on its hot connection path: it never blocks
and never fails. The shared state (coordinator/state.py) consumes the changes
in its own task and publishes them.

Changes are coalesced per node key and the latest wins, so the queue never
holds more than one entry per key, and a consumer that falls behind (or is
restarting) loses nothing that matters: it sees each key's current state,
never a disconnect overtaken by an older connect. A change is taken with
:meth:`get` and stays queued until :meth:`done`, so a consumer that fails
while applying it finds it again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import trio

from relay.protocol.handshake import ClientHello
from relay.protocol.keys import NodeKey

__all__ = ["Presence", "PresenceQueue", "PresenceStats"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Presence:
    key: NodeKey
    #: What the client said in its handshake; None: it disconnected.
    hello: ClientHello | None

    @property
    def connected(self) -> bool:
        return self.hello is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class PresenceStats:
    #: Keys with a change not yet applied by the consumer.
    pending: int
    #: The most keys ever pending at once.
    high_water: int
    #: Changes reported.
    changes: int
    #: Changes replaced by a newer one for the same key before they were applied.
    coalesced: int


class PresenceQueue:
    """Per-key coalescing queue of presence changes: one producer side, one consumer."""

    def __init__(self) -> None:
        # Written by put_nowait (any task); the consumer removes applied entries.
        self._pending: OrderedDict[bytes, Presence] = OrderedDict()
        self._lot = trio.lowlevel.ParkingLot()
        self._high_water = 0
        self._changes = 0
        self._coalesced = 0

    def put_nowait(self, change: Presence) -> None:
        """Report a change; it replaces any change of the same key not yet applied."""
        raw = change.key.raw
        if self._pending.pop(raw, None) is not None:
            self._coalesced += 1
        self._pending[raw] = change
        self._changes += 1
        if len(self._pending) > self._high_water:
            self._high_water = len(self._pending)
        self._lot.unpark_all()

    async def get(self) -> Presence:
        """The oldest pending change; it stays pending until :meth:`done`."""
        while not self._pending:
            await self._lot.park()
        return next(iter(self._pending.values()))

    def done(self, change: Presence) -> None:
        """``change`` was applied: forget it, unless a newer change of its key replaced it."""
        raw = change.key.raw
        if self._pending.get(raw) is change:
            del self._pending[raw]

    def defer(self, change: Presence) -> None:
        """Move ``change`` behind the others (applying it failed; let the rest through)."""
        raw = change.key.raw
        if self._pending.get(raw) is change:
            self._pending.move_to_end(raw)

    def statistics(self) -> PresenceStats:
        return PresenceStats(
            pending=len(self._pending),
            high_water=self._high_water,
            changes=self._changes,
            coalesced=self._coalesced,
        )
