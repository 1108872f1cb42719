"""Mesh links: relays carrying packets for each other's clients.

Every relay dials the relays it needs over the same WebSocket protocol as a
client, proving the shared mesh key with an HMAC over the dialled relay's
challenge (the key never crosses the wire, and is never logged), and pinning
the dialled relay's public key from the registry. A link carries
ForwardPacket frames one way, from dialler to dialled, coalesced like client
traffic; each relay dials its own links, so a pair of busy relays has one
link each way.

- Links to relays of the same region are kept up all the time (failover
  between them must be instant); links to other regions are opened on first
  use and closed after ``link_idle_s`` without traffic.
- A link that drops reconnects with jittered backoff (RelayClient's). Packets
  queued for it meanwhile wait, bounded; beyond the bound they are dropped
  and counted (``mesh_queue_full``).
- A forwarded packet is never forwarded again: the receiving relay delivers
  it to a local client or drops it (``mesh_not_here``).

The routing decision reads MeshState's cache only, never the store, so it
costs a dictionary lookup on the relay's hot path and keeps working while the
store is unreachable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from coordinator.registry import RelayRecord
from coordinator.state import MeshState
from relay.protocol.keys import NodeKey, PrivateKey

from .client import RelayClient
from .server import DropReason, RelayServer

__all__ = ["LinkStats", "Mesh"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkStats:
    relay_id: str
    region: str
    url: str
    connected: bool
    connects: int
    packets_sent: int
    queued: int
    eager: bool


@dataclass
class _Link:
    record: RelayRecord
    client: RelayClient
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    last_used: float = 0.0
    eager: bool = False


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
    ) -> None:
        self._server = server
        self._state = state
        self._key = key
        self._mesh_key = mesh_key
        self._idle_s = link_idle_s
        self._queue = link_queue_packets
        self._me = state.me
        self._links: dict[str, _Link] = {}
        self._nursery: trio.Nursery | None = None
        self.forwarded_out = 0

    # ---- the hot path -------------------------------------------------------

    def forward(self, src: bytes, dest: bytes, payload: bytes) -> bool:
        """Send a packet towards the relay that holds ``dest``; False if none is known."""
        record = self._state.route(dest)
        if record is None or record.relay_id == self._me.relay_id:
            return False
        link = self._links.get(record.relay_id)
        if link is None or link.record.ws_url != record.ws_url:
            link = self._open(record, eager=record.region == self._me.region)
            if link is None:
                return False
        link.last_used = trio.current_time()
        if link.client.forward_nowait(src, dest, payload):
            self.forwarded_out += 1
        else:
            self._server.count_drop(DropReason.MESH_QUEUE_FULL)
        return True

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
                    packets_sent=st.packets_sent,
                    queued=st.send_queued,
                    eager=link.eager,
                )
            )
        return out

    def region_links_down(self) -> list[str]:
        """Relays of our own region whose link is not connected (readiness needs them all)."""
        return sorted(
            rid for rid, link in self._links.items() if link.eager and not link.client.connected
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._state.on_relays_changed.append(self._reconcile)
            self._server.forwarder = self.forward
            try:
                self._reconcile()
                task_status.started()
                while True:
                    await trio.sleep(max(1.0, self._idle_s / 4))
                    self._close_idle()
            finally:
                self._server.forwarder = None
                self._state.on_relays_changed.remove(self._reconcile)
                self._nursery = None

    def _reconcile(self) -> None:
        relays = self._state.relays
        for relay_id, link in list(self._links.items()):
            current = relays.get(relay_id)
            if current is None or current.ws_url != link.record.ws_url:
                self._close(relay_id, "left the registry" if current is None else "moved")
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

    def _open(self, record: RelayRecord, *, eager: bool) -> _Link | None:
        if self._nursery is None:
            return None
        self._close(record.relay_id, "replaced")
        try:
            pinned = NodeKey.parse(record.public_key)
        except ValueError:
            log.warning("relay %s has a malformed key in the registry", record.relay_id)
            return None
        client = RelayClient(
            [record.ws_url],
            self._key,
            mesh_key=self._mesh_key,
            server_key=pinned,
            send_queue_packets=self._queue,
            receive_queue_packets=16,
        )
        link = _Link(record, client, last_used=trio.current_time(), eager=eager)
        self._links[record.relay_id] = link
        self._nursery.start_soon(self._run_link, link)
        log.info("mesh link to %s (%s) opening", record.relay_id, record.ws_url)
        return link

    async def _run_link(self, link: _Link) -> None:
        with link.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: link.client.run(
                        first_must_succeed=False, task_status=task_status
                    )
                )
                # Nothing should arrive on a link; drain so a stray packet cannot block it.
                while True:
                    await link.client.receive()

    def _close(self, relay_id: str, why: str) -> None:
        link = self._links.pop(relay_id, None)
        if link is not None:
            log.info("mesh link to %s closing: %s", relay_id, why)
            link.scope.cancel()
