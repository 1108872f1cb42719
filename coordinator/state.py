"""MeshState: one relay's view of, and contribution to, the shared state.

Three restartable loops in one nursery:

- **registration**: grant a lease, write ``relays/<id>`` and the records of
  every client connected here, keep the lease alive. If the store goes away
  the relay keeps serving and reports itself degraded; it keeps trying the
  same lease (which survives an outage shorter than its TTL), and when the
  store says the lease is gone it registers again and republishes its peers.
  The keepalive is also the probe: when another loop's call fails it runs at
  once, and while the store does not answer it runs every ``_PROBE_S``; the
  first that succeeds wakes the other loops out of their backoff, so a store
  that comes back is in use again (and the relay ready) within that. Their
  own calls, heavier, keep their exponential backoff.
- **publisher**: applies this relay's peer-record changes in order. Changes
  are coalesced per key, so a burst of connects and disconnects never grows a
  queue beyond the number of clients, and a put is never overtaken by an
  older delete of the same key.
- **sync**: reads the whole prefix at revision R, then watches from R + 1, so
  no update is lost between snapshot and subscription; on a broken watch or a
  compacted revision it starts over. Routing reads the resulting cache and
  never waits on the store: while the store is unreachable, routes known
  before keep working, and a new snapshot replaces the cache in one step.
- **presence** (when given the relay server's presence queue): applies the
  connects and disconnects of this relay's clients to what the publisher
  writes. The queue coalesces per key, so nothing is lost while this task
  is behind; a change that fails to apply is counted, retried after the
  others, and never ends the loop.

Nothing here calls into another component. Who needs to know that the relay
table changed (the mesh) takes :meth:`MeshState.open_relay_updates`, a
channel of one slot it drains in its own task: a change while a wake-up is
already pending is covered by that wake-up.

A relay that stops as planned says so first (:meth:`MeshState.announce_leaving`
rewrites its record with ``leaving_at``); a relay record deleted after such an
announcement goes to :attr:`MeshState.departed`, so the mesh's health can tell
a planned stop from a failure even when both changes fell between two of its
rounds.

A peer record deleted in the same revision as its relay's record (lease
expiry) is marked LOST for ``lost_grace_s``; any other delete means GONE. A
peer missing from a new snapshot is LOST if its relay is missing too, or has
registered again since the peer's record was written (its old lease expired,
taking the record with it); otherwise it is GONE.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import trio

from relay.protocol.backoff import Backoff
from relay.protocol.handshake import ClientHello
from relay.protocol.keys import NodeKey

from .peermap import PeerEntry, PeerRecord, PeerState, peer_key
from .presence import PresenceQueue
from .registry import RelayRecord, relay_key
from .store import (
    Compacted,
    EventKind,
    LeaseNotFound,
    Snapshot,
    Store,
    StoreUnavailable,
    WatchBroken,
    WatchEvent,
)

__all__ = ["MeshState", "StateStats"]

log = logging.getLogger(__name__)

_DELETE = object()

#: While the store does not answer, it is tested at least this often (seconds).
_PROBE_S = 0.25
#: A failed call is retried after a jittered delay: first up to this (seconds) ...
_RETRY_INITIAL_S = 0.1
#: ... doubling up to this.
_RETRY_MAX_S = 5.0

#: Planned departures remembered (the oldest are forgotten first).
_DEPARTED_MAX = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class StateStats:
    relays: int
    peers_present: int
    peers_lost: int
    registered: bool
    synced: bool
    degraded: str | None
    resyncs: int
    registrations: int
    revision: int
    pending_writes: int
    #: Presence changes that raised while being applied (each is retried).
    presence_errors: int


class MeshState:
    def __init__(
        self,
        store: Store,
        me: RelayRecord,
        *,
        prefix: str = "/relaymesh/v1/",
        lease_ttl_s: int = 8,
        keepalive_interval_s: float = 2.0,
        lost_grace_s: float = 30.0,
        presence: PresenceQueue | None = None,
    ) -> None:
        self.store = store
        self.me = me
        self.prefix = prefix
        self._ttl = lease_ttl_s
        self._keepalive_s = keepalive_interval_s
        self._grace_s = lost_grace_s
        # The cache, written only by the sync loop.
        self.relays: dict[str, RelayRecord] = {}
        #: Relays that announced a planned stop and then left the registry: their last record.
        self.departed: OrderedDict[str, RelayRecord] = OrderedDict()
        self.peers: dict[bytes, PeerEntry] = {}
        self.revision = 0
        self.synced = False
        self._synced_event = trio.Event()
        self._resyncs = 0
        # Registration, written by the registration loop.
        self.lease = 0
        self.registered = False
        self._registered_event = trio.Event()
        self._registrations = 0
        self.degraded: str | None = "not registered yet"
        # What this relay publishes: written by client (dis)connect, drained by the publisher.
        self._local: dict[str, PeerRecord] = {}
        self._dirty: OrderedDict[str, PeerRecord | object] = OrderedDict()
        self._dirty_event = trio.Event()
        # Owned by the publisher: the value we last wrote per key (for a safe delete).
        self._published: dict[str, bytes] = {}
        # Where the relay server reports its clients; drained by the presence loop.
        self._presence = presence
        self._presence_errors = 0
        # One-slot channels, one per open_relay_updates(); the sync loop sends.
        self._relay_watchers: list[trio.MemorySendChannel[None]] = []
        # Loops waiting out a backoff park here, until the store answers again.
        self._store_back = trio.lowlevel.ParkingLot()
        # The keepalive parks here between keepalives; a failed call elsewhere wakes it.
        self._probe_now = trio.lowlevel.ParkingLot()

    # ---- what routing asks --------------------------------------------------

    def route(self, node_key: bytes) -> RelayRecord | None:
        """The relay that holds ``node_key`` now, if it is known and present."""
        entry = self.peers.get(node_key)
        if entry is None or entry.state is not PeerState.PRESENT:
            return None
        return self.relays.get(entry.record.relay_id)

    def last_relay(self, node_key: bytes) -> str | None:
        """The relay a LOST peer was last on. Its lease expired, which a store outage
        does to relays that are alive; the mesh asks only when route() has no answer."""
        entry = self.peers.get(node_key)
        if entry is None or entry.state is not PeerState.LOST:
            return None
        return entry.record.relay_id

    def statistics(self) -> StateStats:
        lost = sum(1 for e in self.peers.values() if e.state is PeerState.LOST)
        return StateStats(
            relays=len(self.relays),
            peers_present=len(self.peers) - lost,
            peers_lost=lost,
            registered=self.registered,
            synced=self.synced,
            degraded=self.degraded,
            resyncs=self._resyncs,
            registrations=self._registrations,
            revision=self.revision,
            pending_writes=len(self._dirty),
            presence_errors=self._presence_errors,
        )

    async def wait_synced(self) -> None:
        await self._synced_event.wait()

    async def wait_registered(self) -> None:
        await self._registered_event.wait()

    def open_relay_updates(self) -> trio.MemoryReceiveChannel[None]:
        """A channel that yields once after each change of :attr:`relays` (coalesced).

        It starts with one item, so the reader first reconciles with the table
        as it is. Close it when done (``with state.open_relay_updates() as rx``).
        """
        tx, rx = trio.open_memory_channel[None](1)
        tx.send_nowait(None)
        self._relay_watchers.append(tx)
        return rx

    async def announce_leaving(self) -> bool:
        """Mark this relay's record as leaving (a planned stop); True if it was written.

        The record is rewritten under the lease it has, so revoking the lease still
        removes it. Raises StoreUnavailable or LeaseNotFound if the store will not
        take it; without registration there is nothing to mark.
        """
        if self.me.leaving_at is None:
            self.me = replace(self.me, leaving_at=time.time())
        if not self.registered:
            return False
        await self.store.put(
            relay_key(self.prefix, self.me.relay_id), self.me.to_json(), lease=self.lease
        )
        return True

    # ---- what the relay tells us -------------------------------------------

    def client_connected(self, key: NodeKey, hello: ClientHello | None = None) -> None:
        record = PeerRecord(
            relay_id=self.me.relay_id,
            region=self.me.region,
            since=time.time(),
            disco_key=hello.disco_key if hello is not None else None,
            endpoints=list(hello.endpoints) if hello is not None else [],
        )
        self._local[str(key)] = record
        self._mark(str(key), record)

    def client_disconnected(self, key: NodeKey) -> None:
        if self._local.pop(str(key), None) is not None:
            self._mark(str(key), _DELETE)

    def _mark(self, key: str, change: PeerRecord | object) -> None:
        self._dirty.pop(key, None)
        self._dirty[key] = change
        self._dirty_event.set()

    # ---- the loops --------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._registration_loop)
            nursery.start_soon(self._publisher_loop)
            nursery.start_soon(self._sync_loop)
            nursery.start_soon(self._expire_lost_loop)
            if self._presence is not None:
                nursery.start_soon(self._presence_loop, self._presence)
            task_status.started()

    async def _registration_loop(self) -> None:
        backoff = Backoff(_RETRY_INITIAL_S, _PROBE_S)
        while True:
            try:
                lease = await self.store.grant_lease(self._ttl)
                await self.store.put(
                    relay_key(self.prefix, self.me.relay_id), self.me.to_json(), lease=lease
                )
                self.lease = lease
                # Everything connected here goes (back) under the new lease.
                for key, record in list(self._local.items()):
                    if key not in self._dirty:
                        self._mark(key, record)
                self.registered = True
                self._registrations += 1
                self.degraded = None
                self._registered_event.set()
                backoff.reset()
                log.info("registered %s under lease %x", self.me.relay_id, lease)
                # The publisher has work under the new lease; sync may be in a backoff.
                self._dirty_event.set()
                self._store_back.unpark_all()
                await self._keep_alive(lease)
            except StoreUnavailable as exc:
                self._degrade(f"shared state unreachable: {exc}")
                await trio.sleep(backoff.next())
            except LeaseNotFound:
                self._degrade("lease expired; registering again")
                self.registered = False

    async def _keep_alive(self, lease: int) -> None:
        """Until the lease is known to be gone (LeaseNotFound propagates)."""
        backoff = Backoff(_RETRY_INITIAL_S, min(self._keepalive_s, _PROBE_S))
        unreachable = False
        while True:
            if unreachable or self.degraded is not None:
                await trio.sleep(backoff.next())
            else:
                with trio.move_on_after(self._keepalive_s):
                    await self._probe_now.park()
            try:
                await self.store.keepalive(lease)
            except StoreUnavailable as exc:
                self._degrade(f"shared state unreachable: {exc}")
                unreachable = True
                continue
            backoff.reset()
            if unreachable:
                # Only now: a loop whose own calls fail while ours succeed keeps its backoff.
                log.info("shared state reachable again; lease %x still held", lease)
                unreachable = False
                self._store_back.unpark_all()
            self.degraded = None

    def _degrade(self, why: str) -> None:
        if self.degraded != why:
            log.warning("degraded: %s", why)
        self.degraded = why

    async def _retry_after(self, delay_s: float) -> None:
        """After a failed call: probe the store now, and wait ``delay_s`` before retrying,
        or less if the probe finds the store answering again."""
        self._probe_now.unpark_all()
        with trio.move_on_after(delay_s):
            await self._store_back.park()

    async def _publisher_loop(self) -> None:
        backoff = Backoff(_RETRY_INITIAL_S, _RETRY_MAX_S)
        while True:
            if not self._dirty or not self.registered:
                self._dirty_event = trio.Event()
                if self._dirty and not self.registered:
                    with trio.move_on_after(0.2):
                        await self._dirty_event.wait()
                    continue
                await self._dirty_event.wait()
                continue
            key, change = next(iter(self._dirty.items()))
            lease = self.lease
            try:
                if change is _DELETE:
                    # Only our own record: the client may already be on another relay.
                    mine = self._published.get(key)
                    if mine is not None:
                        await self.store.delete(peer_key(self.prefix, key), if_value=mine)
                    self._published.pop(key, None)
                else:
                    assert isinstance(change, PeerRecord)
                    value = change.to_json()
                    await self.store.put(peer_key(self.prefix, key), value, lease=lease)
                    self._published[key] = value
            except (StoreUnavailable, LeaseNotFound) as exc:
                self._degrade(f"cannot publish peers: {exc}")
                await self._retry_after(backoff.next())
                continue
            backoff.reset()
            if self._dirty.get(key) is change:
                del self._dirty[key]

    async def _sync_loop(self) -> None:
        backoff = Backoff(_RETRY_INITIAL_S, _RETRY_MAX_S)
        while True:
            try:
                snap = await self.store.get_prefix(self.prefix)
                self._load(snap)
                async with self.store.watch(self.prefix, snap.revision + 1) as rx:
                    self.synced = True
                    self._synced_event.set()
                    backoff.reset()
                    async for batch in rx:
                        if isinstance(batch, WatchBroken):
                            log.info("watch broken (%s); resynchronising", batch.reason)
                            break
                        self._apply(batch)
            except (StoreUnavailable, Compacted) as exc:
                log.info("sync: %s", exc)
                await self._retry_after(backoff.next())
            self.synced = False
            self._resyncs += 1

    async def _presence_loop(self, queue: PresenceQueue) -> None:
        backoff = Backoff(_RETRY_INITIAL_S, _RETRY_MAX_S)
        failing = ""
        while True:
            change = await queue.get()
            try:
                if change.hello is not None:
                    self.client_connected(change.key, change.hello)
                else:
                    self.client_disconnected(change.key)
            except Exception as exc:
                self._presence_errors += 1
                queue.defer(change)
                delay = backoff.next()
                why = f"{type(exc).__name__}: {exc}"
                if why != failing:
                    log.error("presence of %s not applied: %s", change.key, why, exc_info=exc)
                failing = why
                await trio.sleep(delay)
                continue
            queue.done(change)
            if failing:
                log.info("presence changes apply again")
                failing = ""
                backoff.reset()
            await trio.lowlevel.checkpoint()

    async def _expire_lost_loop(self) -> None:
        while True:
            await trio.sleep(min(1.0, self._grace_s / 4))
            now = trio.current_time()
            for key in [
                k
                for k, e in self.peers.items()
                if e.state is PeerState.LOST and now - e.lost_at >= self._grace_s
            ]:
                del self.peers[key]

    # ---- cache updates ----------------------------------------------------

    def _split(self, key: str) -> tuple[str, str]:
        rest = key[len(self.prefix) :]
        kind, _, name = rest.partition("/")
        return kind, name

    def _load(self, snap: Snapshot) -> None:
        relays: dict[str, RelayRecord] = {}
        registered_at: dict[str, int] = {}
        peers: dict[bytes, PeerEntry] = {}
        for kv in snap.items:
            kind, name = self._split(kv.key)
            try:
                if kind == "relays":
                    relays[name] = RelayRecord.from_json(kv.value)
                    registered_at[name] = kv.mod_revision
                elif kind == "peers":
                    peers[NodeKey.parse(name).raw] = PeerEntry(
                        PeerRecord.from_json(kv.value), PeerState.PRESENT, kv.mod_revision
                    )
            except (ValueError, TypeError) as exc:
                log.warning("ignoring malformed %s: %s", kv.key, exc)
        now = trio.current_time()
        # Peers that vanished while we were not watching: LOST if their relay did too, or
        # if it registered again since (a relay writes its record only when it registers,
        # under a new lease: the old one expired and took the peer's record with it).
        for raw, old in self.peers.items():
            if raw not in peers:
                if old.state is PeerState.LOST:
                    peers[raw] = old
                elif registered_at.get(old.record.relay_id, snap.revision + 1) > old.revision:
                    peers[raw] = PeerEntry(old.record, PeerState.LOST, snap.revision, now)
        for name, old_record in self.relays.items():
            if name not in relays:
                self._relay_gone(old_record)
        for name in relays:
            self.departed.pop(name, None)
        self.relays = relays
        self.peers = peers
        self.revision = snap.revision
        self._notify_relays()

    def _apply(self, batch: list[WatchEvent]) -> None:
        relays_changed = False
        gone_relays = set()
        for ev in batch:
            kind, name = self._split(ev.key)
            if kind == "relays":
                relays_changed = True
                if ev.kind is EventKind.DELETE:
                    gone_relays.add(name)
                    gone = self.relays.pop(name, None)
                    if gone is not None:
                        self._relay_gone(gone)
                else:
                    try:
                        self.relays[name] = RelayRecord.from_json(ev.value)
                    except (ValueError, TypeError) as exc:
                        log.warning("ignoring malformed %s: %s", ev.key, exc)
                    else:
                        self.departed.pop(name, None)
        now = trio.current_time()
        for ev in batch:
            kind, name = self._split(ev.key)
            if kind != "peers":
                continue
            try:
                raw = NodeKey.parse(name).raw
            except ValueError:
                log.warning("ignoring malformed key %s", ev.key)
                continue
            if ev.kind is EventKind.PUT:
                try:
                    record = PeerRecord.from_json(ev.value)
                except (ValueError, TypeError) as exc:
                    log.warning("ignoring malformed %s: %s", ev.key, exc)
                    continue
                self.peers[raw] = PeerEntry(record, PeerState.PRESENT, ev.revision)
                continue
            old = self.peers.get(raw)
            if old is None:
                continue
            if old.record.relay_id in gone_relays or old.record.relay_id not in self.relays:
                self.peers[raw] = PeerEntry(old.record, PeerState.LOST, ev.revision, now)
            else:
                del self.peers[raw]
        if batch:
            self.revision = max(self.revision, batch[-1].revision)
        if relays_changed:
            self._notify_relays()

    def _relay_gone(self, record: RelayRecord) -> None:
        """A relay left the registry: remembered if it had announced a planned stop."""
        if record.leaving_at is None:
            return
        self.departed.pop(record.relay_id, None)
        self.departed[record.relay_id] = record
        while len(self.departed) > _DEPARTED_MAX:
            self.departed.popitem(last=False)

    def _notify_relays(self) -> None:
        for tx in list(self._relay_watchers):
            try:
                tx.send_nowait(None)
            except trio.WouldBlock:
                pass  # a wake-up is already pending; it covers this change too
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._relay_watchers.remove(tx)
