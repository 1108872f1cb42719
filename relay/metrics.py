"""Prometheus metrics for a relay.

The hot path keeps plain integer counters (a prometheus_client ``Counter.inc``
takes a lock, which is too dear per packet); this collector reads them from
:meth:`RelayServer.statistics` at scrape time. Each relay node has its own
registry, so several relays in one process (``relaymesh up``) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .server import DropReason, RelayServer, RelayStats
from .tls import TLSStats

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
        cfg = self._server.cfg.relay
        ident = [cfg.region, cfg.name]
        yield from _traffic(s, ident)
        yield self._accept_errors(s, ident)
        if self._mesh is not None:
            yield from _mesh_links(self._mesh, ident)
        if self._supervisor is not None:
            yield _restarts(self._supervisor, ident)
        yield self._component_errors(s, ident)
        if self._server.tls is not None:
            yield from _tls(self._server.tls.statistics(), ident)
        if self._state is not None:
            yield from _shared_state(self._state, ident)

    def _accept_errors(self, s: RelayStats, ident: list[str]) -> CounterMetricFamily:
        accept_errors = CounterMetricFamily(
            "relaymesh_accept_errors",
            "Failed accepts by port (ws, http) and errno (EMFILE: out of file descriptors);"
            " each is waited out and accepting resumes.",
            labels=[*_LABELS, "port", "reason"],
        )
        for reason, n in sorted(s.accept_errors.items()):
            accept_errors.add_metric([*ident, "ws", reason], n)
        if self._http is not None:
            for reason, n in sorted(self._http.accept_errors.items()):
                accept_errors.add_metric([*ident, "http", reason], n)
        return accept_errors

    def _component_errors(self, s: RelayStats, ident: list[str]) -> CounterMetricFamily:
        # Failures contained without a restart: one HTTP connection, one STUN datagram,
        # one presence change (retried), one mesh link (reopened), one forwarded packet.
        errors = CounterMetricFamily(
            "relaymesh_component_errors",
            "Failures contained inside a component (that connection, datagram, change,"
            " link or packet only), by component.",
            labels=[*_LABELS, "component"],
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
        return errors


def _tls(t: TLSStats, ident: list[str]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    yield _gauge(
        ident,
        "relaymesh_tls_cert_expiry_timestamp_seconds",
        "When the certificate new connections get expires (its notAfter, Unix time).",
        t.not_after,
    )
    reloads = CounterMetricFamily(
        "relaymesh_tls_reloads",
        "Reloads of the certificate and key files (SIGHUP or a file change), by"
        " result; a failed one keeps the previous certificate.",
        labels=[*_LABELS, "result"],
    )
    reloads.add_metric([*ident, "ok"], t.reloads)
    reloads.add_metric([*ident, "failed"], t.reload_failures)
    yield reloads
    yield _gauge(
        ident,
        "relaymesh_tls_last_reload_successful",
        "0 while the latest reload has failed (the previous certificate is served).",
        1.0 if t.last_reload_ok else 0.0,
    )


#: Every metric of a relay is labelled with the relay it describes.
_LABELS = ["region", "relay"]


def _gauge(ident: list[str], name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=_LABELS)
    g.add_metric(ident, value)
    return g


def _counter(ident: list[str], name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=_LABELS)
    c.add_metric(ident, value)
    return c


def _traffic(s: RelayStats, ident: list[str]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The data plane: connections, packets and bytes, drops and closes by reason."""
    yield _gauge(
        ident,
        "relaymesh_clients",
        "Clients connected now (mesh peers and probe clients excluded).",
        s.clients,
    )
    yield _gauge(ident, "relaymesh_mesh_peers", "Mesh peers connected now.", s.mesh_peers)
    yield _gauge(
        ident,
        "relaymesh_probe_clients",
        "The mesh health monitors' probe clients connected now (not in relaymesh_clients).",
        s.probe_clients,
    )
    yield _counter(
        ident, "relaymesh_accepts", "TCP connections accepted on the WebSocket port.", s.accepts
    )
    yield _counter(ident, "relaymesh_handshakes", "Handshakes completed.", s.handshakes_ok)
    yield _counter(
        ident, "relaymesh_packets_received", "Packets received from clients.", s.packets_in
    )
    yield _counter(
        ident, "relaymesh_bytes_received", "Payload bytes received from clients.", s.bytes_in
    )
    yield _counter(ident, "relaymesh_packets_sent", "Packets written to clients.", s.packets_out)
    yield _counter(ident, "relaymesh_bytes_sent", "Frame bytes written to clients.", s.bytes_out)
    yield _counter(
        ident,
        "relaymesh_messages_sent",
        "WebSocket messages written (packets are coalesced).",
        s.messages_out,
    )
    yield _counter(
        ident,
        "relaymesh_rate_limited_seconds",
        "Seconds client readers were paused by the rate limits (bytes, frames that deliver"
        " nothing).",
        s.rate_limited_s,
    )
    yield _counter(
        ident,
        "relaymesh_flow_wait_seconds",
        "Seconds client and mesh readers waited for the queues they fed to drain (flow control).",
        s.flow_waited_s,
    )
    yield _counter(
        ident,
        "relaymesh_flow_gave_up",
        "Flow-control waits given up because the queue's writer took nothing (a receiver"
        " that reads nothing); its packets are dropped instead.",
        s.flow_gave_up,
    )
    yield _counter(
        ident, "relaymesh_frames_skipped", "Frames of unknown type skipped.", s.skipped_frames
    )
    yield _gauge(
        ident,
        "relaymesh_queued_bytes",
        "Bytes queued for clients now (bounded by limits.total_queue_bytes).",
        s.queued_bytes,
    )
    drops = CounterMetricFamily(
        "relaymesh_packets_dropped", "Packets dropped, by reason.", labels=[*_LABELS, "reason"]
    )
    for reason, n in sorted(s.drops.items()):
        drops.add_metric([*ident, reason], n)
    yield drops
    closes = CounterMetricFamily(
        "relaymesh_connections_closed",
        "Connections closed, by reason.",
        labels=[*_LABELS, "reason"],
    )
    for reason, n in sorted(s.closes.items()):
        closes.add_metric([*ident, reason], n)
    yield closes
    yield _counter(
        ident,
        "relaymesh_packets_forwarded_in",
        "Packets other relays forwarded to clients here.",
        s.forwarded_in,
    )


def _mesh_links(mesh: Mesh, ident: list[str]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    yield _counter(
        ident,
        "relaymesh_packets_forwarded_out",
        "Packets sent to other relays over mesh links.",
        mesh.forwarded_out,
    )
    links = GaugeMetricFamily(
        "relaymesh_mesh_link_up",
        "Mesh link connected (1) or not.",
        labels=[*_LABELS, "peer"],
    )
    link_drops = CounterMetricFamily(
        "relaymesh_mesh_link_drops",
        "Packets for another relay lost on the mesh link to it (queue full, lost in"
        " flight, or queued when the link had to be reopened).",
        labels=[*_LABELS, "peer"],
    )
    for link in mesh.statistics():
        links.add_metric([*ident, link.relay_id], 1.0 if link.connected else 0.0)
        link_drops.add_metric([*ident, link.relay_id], link.drops)
    yield links
    yield link_drops


def _restarts(supervisor: Supervisor, ident: list[str]) -> CounterMetricFamily:
    restarts = CounterMetricFamily(
        "relaymesh_component_restarts",
        "Components of the node restarted after a failure, by component.",
        labels=[*_LABELS, "component"],
    )
    sup = supervisor.statistics()
    for name in sorted({*sup.running, *sup.restarts}):
        restarts.add_metric([*ident, name], sup.restarts.get(name, 0))
    return restarts


def _shared_state(
    state: MeshState, ident: list[str]
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    st = state.statistics()
    yield _gauge(
        ident,
        "relaymesh_registered",
        "Registered in the shared state (lease held).",
        1.0 if st.registered else 0.0,
    )
    yield _gauge(
        ident,
        "relaymesh_degraded",
        "1 while the shared state is unreachable.",
        1.0 if st.degraded else 0.0,
    )
    yield _gauge(
        ident, "relaymesh_state_synced", "Peer-map cache in sync.", 1.0 if st.synced else 0.0
    )
    yield _gauge(ident, "relaymesh_known_relays", "Relays in the registry.", st.relays)
    peers = GaugeMetricFamily(
        "relaymesh_known_peers", "Peers in the cache, by state.", labels=[*_LABELS, "state"]
    )
    peers.add_metric([*ident, "present"], st.peers_present)
    peers.add_metric([*ident, "lost"], st.peers_lost)
    yield peers
    yield _counter(
        ident, "relaymesh_state_resyncs", "Full resynchronisations of the cache.", st.resyncs
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
        ident = self._ident
        yield from _probes(self._monitor, ident)
        if doc is None:
            return
        yield from _mesh_relays(doc, ident)
        yield from _mesh_paths(doc, ident)
        yield from _etcd(doc["etcd"], ident)
        yield from _health(doc, ident)


def _probes(
    monitor: MeshMonitor, ident: list[str]
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The paths this relay probes itself."""
    probe_ok = GaugeMetricFamily(
        "relaymesh_probe_success",
        "Last probe over the path from this relay to dst delivered (1) or not (0).",
        labels=[*_LABELS, "dst"],
    )
    probe_rtt = GaugeMetricFamily(
        "relaymesh_probe_rtt_seconds",
        "Round trip of the last successful probe from this relay to dst.",
        labels=[*_LABELS, "dst"],
    )
    probe_failures = GaugeMetricFamily(
        "relaymesh_probe_consecutive_failures",
        "Probes from this relay to dst that failed in a row.",
        labels=[*_LABELS, "dst"],
    )
    probes_sent = CounterMetricFamily(
        "relaymesh_probes_sent", "Probes sent from this relay to dst.", labels=[*_LABELS, "dst"]
    )
    probes_received = CounterMetricFamily(
        "relaymesh_probes_answered",
        "Probes from this relay to dst that came back.",
        labels=[*_LABELS, "dst"],
    )
    for p in monitor.prober.results.values():
        probe_ok.add_metric([*ident, p.dst], 1.0 if p.ok else 0.0)
        if p.rtt_ms is not None:
            probe_rtt.add_metric([*ident, p.dst], p.rtt_ms / 1000)
        probe_failures.add_metric([*ident, p.dst], p.failures)
        probes_sent.add_metric([*ident, p.dst], p.sent)
        probes_received.add_metric([*ident, p.dst], p.received)
    yield from (probe_ok, probe_rtt, probe_failures, probes_sent, probes_received)


def _mesh_relays(
    doc: dict[str, Any], ident: list[str]
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    obs = [*_LABELS, "peer", "peer_region"]
    up = GaugeMetricFamily(
        "relaymesh_mesh_relay_up",
        "A relay of the mesh is up (1) or not (0; down, stale, draining or left), as seen here.",
        labels=obs,
    )
    state = GaugeMetricFamily(
        "relaymesh_mesh_relay_state",
        "1 for the state each relay is in (up, stale, draining, down, left), as seen here.",
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
        for name in ("up", "stale", "draining", "down", "left"):
            state.add_metric([*who, name], 1.0 if r["state"] == name else 0.0)
        if r["pps_in"] is not None:
            pps.add_metric([*who, "in"], r["pps_in"])
            pps.add_metric([*who, "out"], r["pps_out"])
            drops.add_metric(who, r["drops_per_s"])
    yield from (up, state, pps, drops)


def _mesh_paths(
    doc: dict[str, Any], ident: list[str]
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    link_up = GaugeMetricFamily(
        "relaymesh_mesh_path_up",
        "The directed path src → dst works (1) or not (0), as seen here.",
        labels=[*_LABELS, "src", "dst"],
    )
    link_rtt = GaugeMetricFamily(
        "relaymesh_mesh_path_rtt_seconds",
        "Round trip of the last probe over src → dst → src, as seen here.",
        labels=[*_LABELS, "src", "dst"],
    )
    link_pps = GaugeMetricFamily(
        "relaymesh_mesh_path_packets_per_second",
        "Packets per second src forwards to dst over its mesh link, as seen here.",
        labels=[*_LABELS, "src", "dst"],
    )
    link_drops = GaugeMetricFamily(
        "relaymesh_mesh_path_drops_per_second",
        "Packets per second src loses on its mesh link to dst, as seen here.",
        labels=[*_LABELS, "src", "dst"],
    )
    for link in doc["links"]:
        pair = [*ident, link["src"], link["dst"]]
        link_up.add_metric(pair, 1.0 if link["state"] == "up" else 0.0)
        if link["rtt_ms"] is not None:
            link_rtt.add_metric(pair, link["rtt_ms"] / 1000)
        if link["pps"] is not None:
            link_pps.add_metric(pair, link["pps"])
        if link["drops_per_s"] is not None:
            link_drops.add_metric(pair, link["drops_per_s"])
    yield from (link_up, link_rtt, link_pps, link_drops)


def _etcd(
    etcd: dict[str, Any], ident: list[str]
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    if etcd["reachable"] is not None:
        g = GaugeMetricFamily(
            "relaymesh_etcd_reachable", "The shared state answers this relay.", labels=_LABELS
        )
        g.add_metric(ident, 1.0 if etcd["reachable"] else 0.0)
        yield g
    lag = GaugeMetricFamily(
        "relaymesh_etcd_revision_lag",
        "How many revisions each relay's watch is behind the most advanced one, as seen here.",
        labels=[*_LABELS, "peer"],
    )
    for rid, n in etcd["revision_lag"].items():
        lag.add_metric([*ident, rid], n)
    yield lag


def _health(
    doc: dict[str, Any], ident: list[str]
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The problems, and the verdict."""
    problems = GaugeMetricFamily(
        "relaymesh_health_problem",
        "1 for each problem the mesh has now, by code (docs/health.md), as seen here.",
        labels=[*_LABELS, "code", "severity", "subject"],
    )
    for p in doc["problems"]:
        problems.add_metric([*ident, p["code"], p["severity"], p["subject"]], 1.0)
    yield problems
    g = GaugeMetricFamily(
        "relaymesh_health_healthy",
        "1 when the mesh has no error-severity problem, as seen here.",
        labels=_LABELS,
    )
    g.add_metric(ident, 1.0 if doc["healthy"] else 0.0)
    yield g
    g = GaugeMetricFamily(
        "relaymesh_health_updated_timestamp_seconds",
        "When this relay last assembled the mesh's health (Unix time).",
        labels=_LABELS,
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
