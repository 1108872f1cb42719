"""Prometheus metrics for a relay.

The hot path keeps plain integer counters (a prometheus_client ``Counter.inc``
takes a lock, which is too dear per packet); this collector reads them from
:meth:`RelayServer.statistics` at scrape time. Each relay node has its own
registry, so several relays in one process (``relaymesh up``) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .server import RelayServer

__all__ = ["CONTENT_TYPE", "RelayCollector", "relay_registry", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RelayCollector(Collector):
    def __init__(self, server: RelayServer) -> None:
        self._server = server

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
        yield counter("relaymesh_accepts", "WebSocket connections accepted.", s.accepts)
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


def relay_registry(server: RelayServer) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(server))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
