"""The shared-state store: a small Store protocol, and MemoryStore.

Relays share their registry and peer map through a key-value store with
revisions, leases and watches: etcd in production (coordinator/etcd.py), and
:class:`MemoryStore` inside one process (``relaymesh up``, tests). Both pass
the same contract tests.

The contract
------------
- Every change gets a new, increasing *revision*. ``get_prefix`` returns the
  items and the revision they were read at.
- ``watch(prefix, start_revision)`` delivers every change with revision ≥
  ``start_revision`` in order, in batches (one batch per revision at least:
  a batch never splits a revision). Read a prefix at R, watch from R + 1, and
  no update is lost between the two (the coder#7295 race).
- A watch that cannot keep up, or whose connection breaks, delivers
  :class:`WatchBroken` and ends; the caller resynchronises (snapshot + watch).
  A start revision older than the store keeps raises :class:`Compacted`.
- Keys put under a lease are deleted, in one revision, when the lease expires
  or is revoked.
- ``delete(key, if_value=v)`` deletes only if the key still holds ``v``, so a
  relay never deletes a record another relay has written since.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import trio

__all__ = [
    "Compacted",
    "EventKind",
    "KeyValue",
    "LeaseNotFound",
    "MemoryStore",
    "Snapshot",
    "Store",
    "StoreUnavailable",
    "WatchBatch",
    "WatchBroken",
    "WatchEvent",
    "open_memory_store",
]


class StoreUnavailable(Exception):
    """The store cannot be reached now; retry later."""


class LeaseNotFound(Exception):
    """The lease expired or was revoked; its keys are gone."""


class Compacted(Exception):
    """A watch asked for revisions the store no longer keeps."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted up to {compact_revision}")
        self.compact_revision = compact_revision


class EventKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    revision: int
    items: list[KeyValue]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: EventKind
    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class WatchBroken:
    reason: str


WatchBatch = list[WatchEvent] | WatchBroken


class Store(Protocol):
    async def get_prefix(self, prefix: str) -> Snapshot: ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int: ...

    async def delete(self, key: str, *, if_value: bytes | None = None) -> bool: ...

    async def grant_lease(self, ttl_s: int) -> int: ...

    async def keepalive(self, lease: int) -> None: ...

    async def revoke(self, lease: int) -> None: ...

    def watch(
        self, prefix: str, start_revision: int
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[WatchBatch]]: ...


@dataclass
class _Lease:
    ttl_s: int
    deadline: float
    keys: set[str] = field(default_factory=set)


@dataclass
class _Watcher:
    prefix: str
    send: trio.MemorySendChannel[WatchBatch]


class MemoryStore:
    """The Store contract in one process. Lease expiry needs :meth:`run` running."""

    def __init__(self, *, history: int = 10_000, watch_buffer: int = 1024) -> None:
        self._kv: dict[str, KeyValue] = {}
        self._revision = 1
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x1000)
        self._history: deque[WatchEvent] = deque(maxlen=history)
        self._watchers: list[_Watcher] = []
        self._watch_buffer = watch_buffer
        self._lease_changed = trio.Event()

    @property
    def revision(self) -> int:
        return self._revision

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire leases on time, until cancelled."""
        task_status.started()
        while True:
            now = trio.current_time()
            expired = [lid for lid, lease in self._leases.items() if lease.deadline <= now]
            for lid in expired:
                self._drop_lease(lid)
            nearest = min((lease.deadline for lease in self._leases.values()), default=now + 3600)
            self._lease_changed = trio.Event()
            with trio.move_on_at(nearest):
                await self._lease_changed.wait()

    async def get_prefix(self, prefix: str) -> Snapshot:
        await trio.lowlevel.checkpoint()
        items = sorted(
            (kv for k, kv in self._kv.items() if k.startswith(prefix)), key=lambda kv: kv.key
        )
        return Snapshot(self._revision, items)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        await trio.lowlevel.checkpoint()
        if lease and lease not in self._leases:
            raise LeaseNotFound(f"lease {lease:x} not found")
        self._revision += 1
        old = self._kv.get(key)
        if old is not None and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        self._kv[key] = KeyValue(key, value, self._revision, lease)
        if lease:
            self._leases[lease].keys.add(key)
        self._publish([WatchEvent(EventKind.PUT, key, value, self._revision)])
        return self._revision

    async def delete(self, key: str, *, if_value: bytes | None = None) -> bool:
        await trio.lowlevel.checkpoint()
        old = self._kv.get(key)
        if old is None or (if_value is not None and old.value != if_value):
            return False
        self._revision += 1
        self._remove(key)
        self._publish([WatchEvent(EventKind.DELETE, key, b"", self._revision)])
        return True

    async def grant_lease(self, ttl_s: int) -> int:
        await trio.lowlevel.checkpoint()
        lid = next(self._lease_ids)
        self._leases[lid] = _Lease(ttl_s, trio.current_time() + ttl_s)
        self._lease_changed.set()
        return lid

    async def keepalive(self, lease: int) -> None:
        await trio.lowlevel.checkpoint()
        entry = self._leases.get(lease)
        if entry is None:
            raise LeaseNotFound(f"lease {lease:x} not found")
        entry.deadline = trio.current_time() + entry.ttl_s

    async def revoke(self, lease: int) -> None:
        await trio.lowlevel.checkpoint()
        self._drop_lease(lease)

    @asynccontextmanager
    async def watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[trio.MemoryReceiveChannel[WatchBatch]]:
        oldest = self._history[0].revision if self._history else self._revision + 1
        if self._history and start_revision < oldest and len(self._history) == self._history.maxlen:
            raise Compacted(oldest - 1)
        send, receive = trio.open_memory_channel[WatchBatch](self._watch_buffer)
        # Replay what happened since start_revision, a batch per revision.
        by_rev: dict[int, list[WatchEvent]] = {}
        for ev in self._history:
            if ev.revision >= start_revision and ev.key.startswith(prefix):
                by_rev.setdefault(ev.revision, []).append(ev)
        watcher = _Watcher(prefix, send)
        for batch in by_rev.values():
            self._deliver(watcher, batch)
        self._watchers.append(watcher)
        try:
            async with receive:
                yield receive
        finally:
            if watcher in self._watchers:
                self._watchers.remove(watcher)
            send.close()

    # ---- internals --------------------------------------------------------

    def _remove(self, key: str) -> None:
        old = self._kv.pop(key)
        if old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)

    def _drop_lease(self, lid: int) -> None:
        lease = self._leases.pop(lid, None)
        if lease is None or not lease.keys:
            return
        self._revision += 1
        batch = []
        for key in sorted(lease.keys):
            self._kv.pop(key, None)
            batch.append(WatchEvent(EventKind.DELETE, key, b"", self._revision))
        self._publish(batch)

    def _publish(self, batch: list[WatchEvent]) -> None:
        self._history.extend(batch)
        for watcher in list(self._watchers):
            mine = [ev for ev in batch if ev.key.startswith(watcher.prefix)]
            if mine:
                self._deliver(watcher, mine)

    def _deliver(self, watcher: _Watcher, batch: list[WatchEvent]) -> None:
        try:
            watcher.send.send_nowait(batch)
        except trio.WouldBlock:
            # The consumer fell behind: end its watch; it resynchronises from a snapshot.
            if watcher in self._watchers:
                self._watchers.remove(watcher)
            watcher.send.close()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # The watch is ending: its consumer closed the channel before it unsubscribed.
            if watcher in self._watchers:
                self._watchers.remove(watcher)


@asynccontextmanager
async def open_memory_store(**options: int) -> AsyncIterator[MemoryStore]:
    store = MemoryStore(**options)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        try:
            yield store
        finally:
            nursery.cancel_scope.cancel()
