"""Mesh links: relays carrying packets for each other's clients.

Every relay dials the relays it needs over the same WebSocket protocol as a
client, proving the shared mesh key with an HMAC over the dialled relay's
challenge (the key never crosses the wire, and is never logged), and pinning
the dialled relay's public key from the registry. A link carries
ForwardPacket frames one way, from dialler to dialled, coalesced like client
traffic; a run of consecutive packets from one sender to one destination goes
as one ForwardPackets frame (bounded by the frame limit) when the dialled
relay says in its ServerInfo that it takes them (``forward_batch``); each
relay dials its own links, so a pair of busy relays has one link each way.

- Links to relays of the same region are kept up all the time (failover
  between them must be instant); links to other regions are opened on first
  use and closed after ``link_idle_s`` without traffic.
- A link that drops reconnects with jittered backoff (RelayClient's). Packets
  queued for it meanwhile wait, bounded in packets and bytes
  (``link_queue_packets``, ``link_queue_bytes``); beyond the bound new ones are
  dropped and counted (``mesh_queue_full``). Before that, flow control: the
  relay's readers that feed a link whose queue is over its high-water mark
  ([limits] flow_high_water) wait for it to drain (:meth:`Mesh.gate`), and
  the far relay's reader of the link waits on the clients it delivers to, so
  a slow receiver slows the sender across the hop through TCP.
- A forwarded packet is never forwarded again: the receiving relay delivers
  it to a local client or drops it (``mesh_not_here``).
- A relay whose lease expired (its record left the registry, its peers are
  LOST) may well be alive: an etcd outage longer than the lease TTL expires
  every lease at once. While our link to it stays connected it is kept, no
  longer eager, and its LOST peers are still sent there; it is closed once it
  disconnects, and reused if the relay registers again at the same URL.

The routing decision reads MeshState's cache only, never the store, so it
costs a dictionary lookup on the relay's hot path and keeps working while the
store is unreachable.

Wiring: the mesh registers itself with the server as its packet forwarder
(``server.add_forwarder``; the server calls :meth:`Mesh.forward` and contains
its exceptions), and follows the relay table through
``state.open_relay_updates()`` in its own task. Each link runs in its own
guard: a link whose client fails (or is stopped for good because another
connection with this relay's key replaced it) is logged, counted in
``link_failures`` and reopened with a fresh client after a jittered backoff
(0.2 s doubling to 10 s); packets for it queue in the new client meanwhile,
and the other links and the node go on.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field

import trio

from coordinator.registry import RelayRecord
from coordinator.state import MeshState
from relay.protocol.backoff import Backoff
from relay.protocol.keys import NodeKey, PrivateKey
from relay.protocol.wire import DropCode

from .client import RelayClient, RelayClosedError
from .queue import Outbox
from .server import DropReason, RelayServer

__all__ = ["LinkStats", "Mesh"]

log = logging.getLogger(__name__)

#: A failed link is reopened after a jittered delay: first up to this (seconds) ...
_LINK_RESTART_INITIAL_S = 0.2
#: ... doubling up to this ...
_LINK_RESTART_MAX_S = 10.0
#: ... and back to the first step once a link ran this long.
_LINK_STABLE_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkStats:
    relay_id: str
    region: str
    url: str
    connected: bool
    connects: int
    #: Packets handed to this link (each ForwardPacket, and each packet in a ForwardPackets).
    packets_sent: int
    #: Frames its current connection's writer sent (a ForwardPackets carries a run).
    frames_sent: int
    queued: int
    eager: bool
    #: Times this relay's link failed and was reopened since the node started.
    failures: int
    #: Packets for this relay lost on this link: refused by its full queue, lost in
    #: flight when a connection broke, or queued in a client that had to be replaced.
    drops: int


@dataclass
class _Link:
    record: RelayRecord
    client: RelayClient
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    last_used: float = 0.0
    eager: bool = False
    # Written by forward() (queue full) and by the link's task (clients replaced).
    drops: int = 0
    # Written by forward(): packets queued to this link.
    packets: int = 0


class Mesh:
    def __init__(
        self,
        server: RelayServer,
        state: MeshState,
        key: PrivateKey,
        mesh_key: bytes,
        *,
        link_idle_s: float = 60.0,
        link_queue_packets: int = 4096,
        link_queue_bytes: int = 16 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._server = server
        #: What wss:// relays are verified with ([mesh] ca_file; None: the system's store).
        self._ssl_context = ssl_context
        self._state = state
        self._key = key
        self._mesh_key = mesh_key
        self._idle_s = link_idle_s
        self._queue = link_queue_packets
        self._queue_bytes = link_queue_bytes
        limits = server.cfg.limits
        self._flow_high, self._flow_low = limits.flow_high_water, limits.flow_low_water
        self._me = state.me
        self._links: dict[str, _Link] = {}
        self._nursery: trio.Nursery | None = None
        self.forwarded_out = 0
        # Written by the link tasks: failures per relay id.
        self.link_failures: dict[str, int] = {}

    # ---- the hot path -------------------------------------------------------

    def forward_frames(self, src: bytes, dest: bytes, frames: bytes, count: int) -> bool:
        """Send a run of ``count`` packets from ``src`` to ``dest`` (the RecvPacket frames
        ``dest`` is to get) towards the relay that holds ``dest``: as they are, in one
        ForwardRun, where the link takes them; False if no relay is known."""
        link = self._link_to(dest)
        if link is None:
            return False
        link.last_used = trio.current_time()
        queued = link.client.forward_frames_nowait(src, dest, frames, count)
        self._count(link, src, count, queued)
        return True

    def report_drops(self, src: bytes, code: DropCode, count: int) -> bool:
        """Tell the relay that holds ``src`` that ``count`` of the packets it forwarded
        from ``src`` were dropped here (PacketsDroppedFor, where the link takes it).
        False if the link there is not up yet (try again later)."""
        link = self._link_to(src)
        if link is None:
            return True  # no relay holds src now: nobody to tell
        return link.client.report_drops_nowait(src, code, count)

    def _link_to(self, dest: bytes) -> _Link | None:
        """The link towards the relay that holds ``dest`` (opened if need be), or towards
        a LOST peer's last relay while our link there is up; None if there is none."""
        record = self._state.route(dest)
        if record is None:
            relay_id = self._state.last_relay(dest)
            link = self._links.get(relay_id) if relay_id is not None else None
            if link is None or not link.client.connected:
                return None
            return link
        if record.relay_id == self._me.relay_id:
            return None
        link = self._links.get(record.relay_id)
        if link is None or link.record.ws_url != record.ws_url:
            link = self._open(record, eager=record.region == self._me.region)
        return link

    def _count(self, link: _Link, src: bytes, count: int, queued: int) -> None:
        self.forwarded_out += queued
        link.packets += queued
        lost = count - queued
        if lost:
            link.drops += lost
            self._server.count_drop(DropReason.MESH_QUEUE_FULL, lost, src=src)

    def gate(self, dest: bytes) -> Outbox | None:
        """The link queue packets for ``dest`` wait in, if a link carries them (flow control)."""
        record = self._state.route(dest)
        relay_id = record.relay_id if record is not None else self._state.last_relay(dest)
        link = self._links.get(relay_id) if relay_id is not None else None
        return link.client.outbox if link is not None else None

    # ---- links ----------------------------------------------------------------

    def statistics(self) -> list[LinkStats]:
        out = []
        for link in self._links.values():
            st = link.client.statistics()
            out.append(
                LinkStats(
                    relay_id=link.record.relay_id,
                    region=link.record.region,
                    url=link.record.ws_url,
                    connected=st.connected,
                    connects=st.connects,
                    packets_sent=link.packets,
                    frames_sent=st.packets_sent,
                    queued=st.send_queued,
                    eager=link.eager,
                    failures=self.link_failures.get(link.record.relay_id, 0),
                    drops=link.drops + st.lost_in_flight,
                )
            )
        return out

    def region_links_down(self) -> list[str]:
        """Relays of our own region whose link is not connected (readiness needs them all)."""
        down = {
            rid for rid, link in self._links.items() if link.eager and not link.client.connected
        }
        me = self._me
        down.update(
            rid
            for rid, record in self._state.relays.items()
            if rid != me.relay_id and record.region == me.region and rid not in self._links
        )
        return sorted(down)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the links up until cancelled (restartable: a new run starts from no links)."""
        with self._state.open_relay_updates() as updates:
            async with trio.open_nursery() as nursery:
                self._links = {}
                self._nursery = nursery
                self._server.add_forwarder(self)
                try:
                    await updates.receive()
                    self._reconcile()
                    nursery.start_soon(self._follow_relays, updates)
                    task_status.started()
                    while True:
                        await trio.sleep(max(1.0, self._idle_s / 4))
                        self._close_idle()
                finally:
                    self._server.remove_forwarder(self)
                    self._nursery = None

    async def _follow_relays(self, updates: trio.MemoryReceiveChannel[None]) -> None:
        async for _ in updates:
            self._reconcile()

    def _reconcile(self) -> None:
        relays = self._state.relays
        for relay_id, link in list(self._links.items()):
            current = relays.get(relay_id)
            if current is None and link.client.connected:
                # Its lease expired but it still answers: keep the link for its LOST peers.
                link.eager = False
            elif current is None or current.ws_url != link.record.ws_url:
                self._close(relay_id, "left the registry" if current is None else "moved")
            else:
                link.eager = current.region == self._me.region
        for relay_id, record in relays.items():
            if (
                relay_id != self._me.relay_id
                and record.region == self._me.region
                and relay_id not in self._links
            ):
                self._open(record, eager=True)

    def _close_idle(self) -> None:
        now = trio.current_time()
        for relay_id, link in list(self._links.items()):
            if not link.eager and now - link.last_used > self._idle_s:
                self._close(relay_id, f"idle for {self._idle_s:g} s")
            elif relay_id not in self._state.relays and not link.client.connected:
                self._close(relay_id, "left the registry")

    def _open(self, record: RelayRecord, *, eager: bool) -> _Link | None:
        if self._nursery is None:
            return None
        self._close(record.relay_id, "replaced")
        try:
            NodeKey.parse(record.public_key)
        except ValueError:
            log.warning("relay %s has a malformed key in the registry", record.relay_id)
            return None
        link = _Link(record, self._new_client(record), last_used=trio.current_time(), eager=eager)
        self._links[record.relay_id] = link
        self._nursery.start_soon(self._run_link, link)
        log.info("mesh link to %s (%s) opening", record.relay_id, record.ws_url)
        return link

    async def _run_link(self, link: _Link) -> None:
        relay_id = link.record.relay_id
        backoff = Backoff(initial_s=_LINK_RESTART_INITIAL_S, max_s=_LINK_RESTART_MAX_S)
        with link.scope:
            while True:
                began = trio.current_time()
                try:
                    await self._run_client(link.client)
                except Exception as exc:
                    failure: Exception = exc
                else:
                    failure = RuntimeError("the link's client returned")
                self.link_failures[relay_id] = self.link_failures.get(relay_id, 0) + 1
                if trio.current_time() - began >= _LINK_STABLE_S:
                    backoff.reset()
                delay = backoff.next()
                if _only(failure, RelayClosedError):
                    # Another connection with this relay's key took the link over.
                    log.warning(
                        "mesh link to %s stopped: %s; reopening in %.2f s",
                        relay_id,
                        failure,
                        delay,
                    )
                else:
                    log.error(
                        "mesh link to %s failed; reopening in %.2f s",
                        relay_id,
                        delay,
                        exc_info=failure,
                    )
                # Packets for it queue (bounded) in the new client while we wait;
                # what the old one still held, or lost in flight, is lost.
                old = link.client.statistics()
                link.drops += old.lost_in_flight + old.send_queued
                link.client = self._new_client(link.record)
                await trio.sleep(delay)

    @staticmethod
    async def _run_client(client: RelayClient) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: client.run(first_must_succeed=False, task_status=task_status)
            )
            # Nothing should arrive on a link; drain so a stray packet cannot block it.
            while True:
                await client.receive()

    def _new_client(self, record: RelayRecord) -> RelayClient:
        return RelayClient(
            [record.ws_url],
            self._key,
            mesh_key=self._mesh_key,
            server_key=NodeKey.parse(record.public_key),
            send_queue_packets=self._queue,
            send_queue_bytes=self._queue_bytes,
            receive_queue_packets=16,
            ssl_context=self._ssl_context,
            flow_marks=(self._flow_high, self._flow_low),
        )

    def _close(self, relay_id: str, why: str) -> None:
        link = self._links.pop(relay_id, None)
        if link is not None:
            log.info("mesh link to %s closing: %s", relay_id, why)
            link.scope.cancel()


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """``exc`` is a ``kind``, or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(e, kind) for e in exc.exceptions)
    return isinstance(exc, kind)
