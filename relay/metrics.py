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

from .server import DropReason, RelayServer

if TYPE_CHECKING:
    from coordinator.state import MeshState

    from .http import HttpStats
    from .mesh import Mesh
    from .monitor import MeshMonitor
    from .stun_server import StunStats
    from .supervisor import Supervisor

__all__ = ["CONTENT_TYPE", "MeshHealthCollector", "RelayCollector", "relay_registry", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RelayCollector(Collector):
    def __init__(
        self,
        server: RelayServer,
        state: MeshState | None = None,
        mesh: Mesh | None = None,
        *,
        supervisor: Supervisor | None = None,
        http_stats: HttpStats | None = None,
        stun_stats: StunStats | None = None,
    ) -> None:
        self._server = server
        self._state = state
        self._mesh = mesh
        self._supervisor = supervisor
        self._http = http_stats
        self._stun = stun_stats

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
        accept_errors = CounterMetricFamily(
            "relaymesh_accept_errors",
            "Failed accepts by port (ws, http) and errno (EMFILE: out of file descriptors);"
            " each is waited out and accepting resumes.",
            labels=[*labels, "port", "reason"],
        )
        for reason, n in sorted(s.accept_errors.items()):
            accept_errors.add_metric([*ident, "ws", reason], n)
        if self._http is not None:
            for reason, n in sorted(self._http.accept_errors.items()):
                accept_errors.add_metric([*ident, "http", reason], n)
        yield accept_errors
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
        if self._supervisor is not None:
            restarts = CounterMetricFamily(
                "relaymesh_component_restarts",
                "Components of the node restarted after a failure, by component.",
                labels=[*labels, "component"],
            )
            sup = self._supervisor.statistics()
            for name in sorted({*sup.running, *sup.restarts}):
                restarts.add_metric([*ident, name], sup.restarts.get(name, 0))
            yield restarts
        # Failures contained without a restart: one HTTP connection, one STUN datagram,
        # one presence change (retried), one mesh link (reopened), one forwarded packet.
        errors = CounterMetricFamily(
            "relaymesh_component_errors",
            "Failures contained inside a component (that connection, datagram, change,"
            " link or packet only), by component.",
            labels=[*labels, "component"],
        )
        errors.add_metric([*ident, "forwarder"], s.drops[DropReason.FORWARD_ERROR.value])
        if self._http is not None:
            errors.add_metric([*ident, "http"], self._http.errors)
        if self._stun is not None:
            errors.add_metric([*ident, "stun"], self._stun.errors)
        if self._state is not None:
            errors.add_metric([*ident, "presence"], self._state.statistics().presence_errors)
        if self._mesh is not None:
            errors.add_metric([*ident, "mesh_link"], sum(self._mesh.link_failures.values()))
        yield errors
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


class MeshHealthCollector(Collector):
    """Every figure of the dashboard, as this relay's monitor last saw the mesh.

    Each relay exports the whole mesh as it sees it (``relay`` names the
    observer, ``peer``/``src``/``dst`` what is observed), so any one relay
    scraped is enough; the probe figures are only those of the paths this
    relay probes itself, so summing over relays never counts a probe twice.
    """

    def __init__(self, ident: list[str], monitor: MeshMonitor) -> None:
        self._ident = ident
        self._monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        doc = self._monitor.document()
        ident, labels = self._ident, ["region", "relay"]
        probe_ok = GaugeMetricFamily(
            "relaymesh_probe_success",
            "Last probe over the path from this relay to dst delivered (1) or not (0).",
            labels=[*labels, "dst"],
        )
        probe_rtt = GaugeMetricFamily(
            "relaymesh_probe_rtt_seconds",
            "Round trip of the last successful probe from this relay to dst.",
            labels=[*labels, "dst"],
        )
        probe_failures = GaugeMetricFamily(
            "relaymesh_probe_consecutive_failures",
            "Probes from this relay to dst that failed in a row.",
            labels=[*labels, "dst"],
        )
        probes_sent = CounterMetricFamily(
            "relaymesh_probes_sent", "Probes sent from this relay to dst.", labels=[*labels, "dst"]
        )
        probes_received = CounterMetricFamily(
            "relaymesh_probes_answered",
            "Probes from this relay to dst that came back.",
            labels=[*labels, "dst"],
        )
        for p in self._monitor.prober.results.values():
            probe_ok.add_metric([*ident, p.dst], 1.0 if p.ok else 0.0)
            if p.rtt_ms is not None:
                probe_rtt.add_metric([*ident, p.dst], p.rtt_ms / 1000)
            probe_failures.add_metric([*ident, p.dst], p.failures)
            probes_sent.add_metric([*ident, p.dst], p.sent)
            probes_received.add_metric([*ident, p.dst], p.received)
        yield from (probe_ok, probe_rtt, probe_failures, probes_sent, probes_received)
        if doc is None:
            return
        obs = [*labels, "peer", "peer_region"]
        up = GaugeMetricFamily(
            "relaymesh_mesh_relay_up",
            "A relay of the mesh is up (1) or not (0; down, stale or draining), as seen here.",
            labels=obs,
        )
        state = GaugeMetricFamily(
            "relaymesh_mesh_relay_state",
            "1 for the state each relay is in (up, stale, draining, down), as seen here.",
            labels=[*obs, "state"],
        )
        pps = GaugeMetricFamily(
            "relaymesh_mesh_relay_packets_per_second",
            "Packets per second through each relay, by direction, as seen here.",
            labels=[*obs, "direction"],
        )
        drops = GaugeMetricFamily(
            "relaymesh_mesh_relay_drops_per_second",
            "Dropped packets per second on each relay, as seen here.",
            labels=obs,
        )
        for r in doc["relays"]:
            who = [*ident, r["relay_id"], r["region"]]
            up.add_metric(who, 1.0 if r["state"] == "up" else 0.0)
            for name in ("up", "stale", "draining", "down"):
                state.add_metric([*who, name], 1.0 if r["state"] == name else 0.0)
            if r["pps_in"] is not None:
                pps.add_metric([*who, "in"], r["pps_in"])
                pps.add_metric([*who, "out"], r["pps_out"])
                drops.add_metric(who, r["drops_per_s"])
        yield from (up, state, pps, drops)
        link_up = GaugeMetricFamily(
            "relaymesh_mesh_path_up",
            "The directed path src → dst works (1) or not (0), as seen here.",
            labels=[*labels, "src", "dst"],
        )
        link_rtt = GaugeMetricFamily(
            "relaymesh_mesh_path_rtt_seconds",
            "Round trip of the last probe over src → dst → src, as seen here.",
            labels=[*labels, "src", "dst"],
        )
        for link in doc["links"]:
            pair = [*ident, link["src"], link["dst"]]
            link_up.add_metric(pair, 1.0 if link["state"] == "up" else 0.0)
            if link["rtt_ms"] is not None:
                link_rtt.add_metric(pair, link["rtt_ms"] / 1000)
        yield from (link_up, link_rtt)
        etcd = doc["etcd"]
        if etcd["reachable"] is not None:
            g = GaugeMetricFamily(
                "relaymesh_etcd_reachable", "The shared state answers this relay.", labels=labels
            )
            g.add_metric(ident, 1.0 if etcd["reachable"] else 0.0)
            yield g
        lag = GaugeMetricFamily(
            "relaymesh_etcd_revision_lag",
            "How many revisions each relay's watch is behind the most advanced one, as seen here.",
            labels=[*labels, "peer"],
        )
        for rid, n in etcd["revision_lag"].items():
            lag.add_metric([*ident, rid], n)
        yield lag
        problems = GaugeMetricFamily(
            "relaymesh_health_problem",
            "1 for each problem the mesh has now, by code (docs/health.md), as seen here.",
            labels=[*labels, "code", "severity", "subject"],
        )
        for p in doc["problems"]:
            problems.add_metric([*ident, p["code"], p["severity"], p["subject"]], 1.0)
        yield problems
        g = GaugeMetricFamily(
            "relaymesh_health_healthy",
            "1 when the mesh has no error-severity problem, as seen here.",
            labels=labels,
        )
        g.add_metric(ident, 1.0 if doc["healthy"] else 0.0)
        yield g
        g = GaugeMetricFamily(
            "relaymesh_health_updated_timestamp_seconds",
            "When this relay last assembled the mesh's health (Unix time).",
            labels=labels,
        )
        g.add_metric(ident, doc["generated_at"])
        yield g


def relay_registry(
    server: RelayServer,
    *,
    state: MeshState | None = None,
    mesh: Mesh | None = None,
    supervisor: Supervisor | None = None,
    http_stats: HttpStats | None = None,
    stun_stats: StunStats | None = None,
    monitor: MeshMonitor | None = None,
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        RelayCollector(
            server,
            state,
            mesh,
            supervisor=supervisor,
            http_stats=http_stats,
            stun_stats=stun_stats,
        )
    )
    if monitor is not None:
        cfg = server.cfg.relay
        registry.register(MeshHealthCollector([cfg.region, cfg.name], monitor))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
