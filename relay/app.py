"""The relay's HTTP API: ``create_app(cfg, server)`` for hypercorn + quart-trio.

Served next to the WebSocket data plane, on its own port, inside the node's
nursery (see relay/node.py). Endpoints:

- ``/healthz``: 200 "ok" while the process serves (liveness).
- ``/readyz``: 200 when the node can do its whole job: registered in the shared
  state (lease held), its cache in sync, links to its region's relays up;
  503 with the reasons otherwise. A lone relay (no shared state) is ready.
- ``/metrics``: Prometheus text exposition (relay/metrics.py).
- ``/api/v1/status``: this relay, as JSON, for scripts and the mesh monitor.
- ``/api/v1/mesh``: the whole mesh's health (relay/health.py, docs/health.md).
- ``/dashboard``: the operator's page over ``/api/v1/mesh`` (relay/dashboard/).
- ``/generate_204`` and ``/derp/latency-check``: empty answers for latency probes.
- ``/regionmap``: the region map, live (region/live.py), with ETag /
  If-None-Match and Cache-Control, signed when the operator gave a key.
- ``/api/v1/peers/<nodekey>``: where this relay would send a packet for that key,
  with the client's disco key and endpoints: for operators and relays only
  (``Authorization: Bearer <api_token(mesh key)>``). Anyone else gets the same
  401 for every key, known or not, so the route is no oracle of who is
  connected. Clients learn each other's endpoints by sealed disco through the
  relays, never here (docs/PROTOCOL.md, "Who may see endpoints").

Served by :func:`relay.http.serve_app` (hypercorn, one error boundary per
connection).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import asdict
from importlib import resources
from typing import TYPE_CHECKING, Any

from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry
from quart import Response, request
from quart_trio import QuartTrio

from coordinator.registry import RelayRecord
from region.live import SIGNATURE_HEADER, etag, live_map, sign
from region.model import RegionMap
from relay.protocol.keys import NodeKey

from . import __version__
from .config import RelayConfig
from .http import HttpStats
from .metrics import CONTENT_TYPE, relay_registry, render
from .monitor import MeshMonitor
from .server import RelayServer
from .stun_server import StunStats

if TYPE_CHECKING:
    from coordinator.state import MeshState

    from .mesh import Mesh
    from .supervisor import Supervisor

__all__ = ["api_token", "create_app"]

_API_TOKEN_CONTEXT = b"relaymesh api v1"


def api_token(mesh_key: bytes) -> str:
    """The bearer token of the peer API: HMAC-SHA256(mesh key, "relaymesh api v1"), hex.

    Whoever holds the mesh key (operators, relays) can derive it; the mesh key
    itself never travels, and a leaked token does not admit anyone to the mesh.
    """
    return hmac.new(mesh_key, _API_TOKEN_CONTEXT, hashlib.sha256).hexdigest()


def readiness(state: MeshState | None, mesh: Mesh | None) -> list[str]:
    """Why the node is not ready; empty when it is."""
    if state is None:
        return []
    problems = []
    if not state.registered:
        problems.append("not registered in the shared state")
    if state.degraded:
        problems.append(state.degraded)
    if not state.synced:
        problems.append("peer map not in sync with the shared state")
    if mesh is not None:
        down = mesh.region_links_down()
        if down:
            problems.append("mesh links down: " + ", ".join(down))
    return problems


def create_app(
    cfg: RelayConfig,
    server: RelayServer,
    *,
    state: MeshState | None = None,
    mesh: Mesh | None = None,
    relays: Callable[[], list[RelayRecord]] | None = None,
    region_map: RegionMap | None = None,
    signing_key: SigningKey | None = None,
    stun_stats: StunStats | None = None,
    http_stats: HttpStats | None = None,
    supervisor: Supervisor | None = None,
    monitor: MeshMonitor | None = None,
    mesh_key: bytes | None = None,
) -> QuartTrio:
    """``mesh_key``: without it no caller may read the peer API."""
    app = QuartTrio("relaymesh")
    _add_regionmap(app, region_map, relays, signing_key)
    registry = relay_registry(
        server,
        state=state,
        mesh=mesh,
        supervisor=supervisor,
        http_stats=http_stats,
        stun_stats=stun_stats,
        monitor=monitor,
    )
    _add_probes(app, state, mesh, registry)
    _add_peer_api(app, server, state, mesh_key)
    _add_mesh_health(app, monitor)
    started = time.time()

    @app.get("/api/v1/status")
    async def status() -> dict[str, Any]:
        return _status(cfg, server, state, mesh, monitor, stun_stats, supervisor, started)

    return app


def _add_regionmap(
    app: QuartTrio,
    region_map: RegionMap | None,
    relays: Callable[[], list[RelayRecord]] | None,
    signing_key: SigningKey | None,
) -> None:
    @app.get("/regionmap")
    async def regionmap() -> Response:
        body = live_map(region_map, relays() if relays is not None else []).to_json()
        tag = etag(body)
        headers = {"ETag": tag, "Cache-Control": "public, max-age=5"}
        if signing_key is not None:
            headers[SIGNATURE_HEADER] = sign(body, signing_key)
        if tag in request.headers.get("If-None-Match", ""):
            return Response("", status=304, headers=headers)
        return Response(body, content_type="application/json", headers=headers)


def _add_probes(
    app: QuartTrio, state: MeshState | None, mesh: Mesh | None, registry: CollectorRegistry
) -> None:
    """What load balancers, Prometheus and latency probes ask."""

    @app.get("/readyz")
    async def readyz() -> tuple[dict[str, Any], int]:
        problems = readiness(state, mesh)
        return {"ready": not problems, "problems": problems}, (503 if problems else 200)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response("ok\n", content_type="text/plain")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render(registry), content_type=CONTENT_TYPE)

    @app.get("/generate_204")
    @app.get("/derp/latency-check")
    async def latency_check() -> Response:
        return Response("", status=204)


def _add_peer_api(
    app: QuartTrio, server: RelayServer, state: MeshState | None, mesh_key: bytes | None
) -> None:
    peer_api_token = api_token(mesh_key).encode() if mesh_key is not None else None

    def operator() -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if peer_api_token is None or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "replace"), peer_api_token)

    @app.get("/api/v1/peers/<node_key>")
    async def peer(node_key: str) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Where this relay would send a packet for ``node_key``, and why (operators only)."""
        if not operator():
            # Checked before the key is even parsed: one answer for every key.
            return (
                {"error": "unauthorized: this API needs the operator token"},
                401,
                {"WWW-Authenticate": 'Bearer realm="relaymesh"'},
            )
        try:
            raw = NodeKey.parse(node_key).raw
        except ValueError as exc:
            return {"error": str(exc)}, 400, {}
        hello = server.client_hello(NodeKey(raw))
        entry = state.peers.get(raw) if state is not None else None
        if hello is None and entry is None:
            return {"node_key": node_key, "local": False, "known": False}, 404, {}
        record = asdict(entry.record) if entry is not None else None
        return (
            {
                "node_key": node_key,
                "local": hello is not None,
                "known": entry is not None,
                "state": entry.state.value if entry is not None else None,
                "record": record,
                "disco_key": hello.disco_key
                if hello is not None
                else (record or {}).get("disco_key"),
                "endpoints": list(hello.endpoints)
                if hello is not None
                else (record or {}).get("endpoints", []),
            },
            200,
            {},
        )


def _add_mesh_health(app: QuartTrio, monitor: MeshMonitor | None) -> None:
    """The mesh's health as JSON, and the dashboard that draws it."""

    @app.get("/api/v1/mesh")
    async def mesh_status() -> tuple[dict[str, Any], int]:
        doc = monitor.document() if monitor is not None else None
        if doc is None:
            why = "mesh health is off ([health] enabled)" if monitor is None else "starting"
            return {"error": why}, 503
        return {**doc, "served_at": time.time()}, 200

    @app.get("/dashboard")
    async def dashboard_page() -> Response:
        return _asset("index.html")

    @app.get("/dashboard/<name>")
    async def dashboard_asset(name: str) -> Response:
        return _asset(name)


def _status(
    cfg: RelayConfig,
    server: RelayServer,
    state: MeshState | None,
    mesh: Mesh | None,
    monitor: MeshMonitor | None,
    stun_stats: StunStats | None,
    supervisor: Supervisor | None,
    started: float,
) -> dict[str, Any]:
    """The document of ``/api/v1/status``."""
    stats = server.statistics()
    queued = [c.data_queued for c in server.client_statistics()]
    return {
        "region": cfg.relay.region,
        "name": cfg.relay.name,
        "public_key": str(server.key.public),
        "version": __version__,
        "uptime_s": round(time.time() - started, 3),
        "ws_port": server.port,
        "stats": {
            "clients": stats.clients,
            "mesh_peers": stats.mesh_peers,
            "probe_clients": stats.probe_clients,
            "packets_in": stats.packets_in,
            "packets_out": stats.packets_out,
            "bytes_in": stats.bytes_in,
            "bytes_out": stats.bytes_out,
            "drops": stats.drops,
            "closes": stats.closes,
            "forwarded_in": stats.forwarded_in,
            "rate_limited_s": round(stats.rate_limited_s, 3),
        },
        "draining": server.draining,
        "queues": {"data_queued": sum(queued), "data_queued_max": max(queued, default=0)},
        "probes": monitor.probe_results() if monitor is not None else [],
        "ready": not readiness(state, mesh),
        "problems": readiness(state, mesh),
        "shared_state": asdict(state.statistics()) if state is not None else None,
        "mesh_links": [asdict(link) for link in mesh.statistics()] if mesh else [],
        "relays": sorted(state.relays) if state is not None else [],
        "stun": {
            "requests": stun_stats.requests,
            "malformed": stun_stats.malformed,
            "errors": stun_stats.errors,
        }
        if stun_stats is not None
        else None,
        "components": asdict(supervisor.statistics()) if supervisor is not None else None,
    }


_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}


def _asset(name: str) -> Response:
    """A file of the dashboard, shipped in the package (no CDN: operators run offline)."""
    if name not in _ASSETS:
        return Response("not found\n", status=404, content_type="text/plain")
    body = resources.files("relay").joinpath("dashboard", name).read_bytes()
    return Response(body, content_type=_ASSETS[name], headers={"Cache-Control": "no-cache"})
