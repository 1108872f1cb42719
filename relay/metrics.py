"""Prometheus metrics for a relay.

The hot path keeps plain integer counters (a prometheus_client ``Counter.inc``
takes a lock, which is too dear per packet); this collector reads them from
:meth:`RelayServer.statistics` at scrape time. Each relay node has its own
registry, so several relays in one process (``relaymesh up``) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .server import RelayServer

if TYPE_CHECKING:
    from coordinator.state import MeshState

    from .mesh import Mesh

__all__ = ["CONTENT_TYPE", "RelayCollector", "relay_registry", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RelayCollector(Collector):
    def __init__(
        self, server: RelayServer, state: MeshState | None = None, mesh: Mesh | None = None
    ) -> None:
        self._server = server
        self._state = state
        self._mesh = mesh

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._server.statistics()
        labels = ["region", "relay"]
        cfg = self._server.cfg.relay
        ident = [cfg.region, cfg.name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(ident, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(ident, value)
            return c

        yield gauge("relaymesh_clients", "Clients connected now (mesh peers excluded).", s.clients)
        yield gauge("relaymesh_mesh_peers", "Mesh peers connected now.", s.mesh_peers)
        yield counter(
            "relaymesh_accepts", "TCP connections accepted on the WebSocket port.", s.accepts
        )
        yield counter("relaymesh_handshakes", "Handshakes completed.", s.handshakes_ok)
        yield counter("relaymesh_packets_received", "Packets received from clients.", s.packets_in)
        yield counter(
            "relaymesh_bytes_received", "Payload bytes received from clients.", s.bytes_in
        )
        yield counter("relaymesh_packets_sent", "Packets written to clients.", s.packets_out)
        yield counter("relaymesh_bytes_sent", "Frame bytes written to clients.", s.bytes_out)
        yield counter(
            "relaymesh_messages_sent",
            "WebSocket messages written (packets are coalesced).",
            s.messages_out,
        )
        yield counter(
            "relaymesh_rate_limited_seconds",
            "Seconds client readers were paused by the rate limit.",
            s.rate_limited_s,
        )
        yield counter(
            "relaymesh_frames_skipped", "Frames of unknown type skipped.", s.skipped_frames
        )
        drops = CounterMetricFamily(
            "relaymesh_packets_dropped", "Packets dropped, by reason.", labels=[*labels, "reason"]
        )
        for reason, n in sorted(s.drops.items()):
            drops.add_metric([*ident, reason], n)
        yield drops
        closes = CounterMetricFamily(
            "relaymesh_connections_closed",
            "Connections closed, by reason.",
            labels=[*labels, "reason"],
        )
        for reason, n in sorted(s.closes.items()):
            closes.add_metric([*ident, reason], n)
        yield closes
        yield counter(
            "relaymesh_packets_forwarded_in",
            "Packets other relays forwarded to clients here.",
            s.forwarded_in,
        )
        if self._mesh is not None:
            yield counter(
                "relaymesh_packets_forwarded_out",
                "Packets sent to other relays over mesh links.",
                self._mesh.forwarded_out,
            )
            links = GaugeMetricFamily(
                "relaymesh_mesh_link_up",
                "Mesh link connected (1) or not.",
                labels=[*labels, "peer"],
            )
            for link in self._mesh.statistics():
                links.add_metric([*ident, link.relay_id], 1.0 if link.connected else 0.0)
            yield links
        if self._state is not None:
            st = self._state.statistics()
            yield gauge(
                "relaymesh_registered",
                "Registered in the shared state (lease held).",
                1.0 if st.registered else 0.0,
            )
            yield gauge(
                "relaymesh_degraded",
                "1 while the shared state is unreachable.",
                1.0 if st.degraded else 0.0,
            )
            yield gauge(
                "relaymesh_state_synced", "Peer-map cache in sync.", 1.0 if st.synced else 0.0
            )
            yield gauge("relaymesh_known_relays", "Relays in the registry.", st.relays)
            peers = GaugeMetricFamily(
                "relaymesh_known_peers", "Peers in the cache, by state.", labels=[*labels, "state"]
            )
            peers.add_metric([*ident, "present"], st.peers_present)
            peers.add_metric([*ident, "lost"], st.peers_lost)
            yield peers
            yield counter(
                "relaymesh_state_resyncs", "Full resynchronisations of the cache.", st.resyncs
            )


def relay_registry(
    server: RelayServer, *, state: MeshState | None = None, mesh: Mesh | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(server, state, mesh))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
