"""The relay's HTTP API: ``create_app(cfg, server)`` for hypercorn + quart-trio.

Served next to the WebSocket data plane, on its own port, inside the node's
nursery (see relay/node.py). Endpoints:

- ``/healthz``: 200 "ok" while the process serves (liveness).
- ``/readyz``: 200 when the node can do its whole job: registered in the shared
  state (lease held), its cache in sync, links to its region's relays up;
  503 with the reasons otherwise. A lone relay (no shared state) is ready.
- ``/metrics``: Prometheus text exposition (relay/metrics.py).
- ``/api/v1/status``: JSON for the dashboard and scripts.
- ``/generate_204`` and ``/derp/latency-check``: empty answers for latency probes.
- ``/regionmap``: the region map, live (region/live.py), with ETag /
  If-None-Match and Cache-Control, signed when the operator gave a key.
- ``/api/v1/peers/<nodekey>``: where this relay would send a packet for that key.

:func:`serve_app` serves it with hypercorn's HTTP machinery, each connection
inside its own error boundary. ``hypercorn.trio.serve`` runs every connection
in one nursery shared with its listener, so one connection's unexpected
exception ends the whole HTTP server; and one can be provoked from outside:
a chunked request with a bad chunk header makes hypercorn's trio TCPServer
send its 400 while the app's task is half-closing the same socket
(``send_eof`` outside the send lock: ``trio.BusyResourceError``). Here that
connection is closed and counted (``HttpStats.errors``), and the others go on.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import wrap_app
from nacl.signing import SigningKey
from quart import Response, request
from quart_trio import QuartTrio

from coordinator.registry import RelayRecord
from region.live import SIGNATURE_HEADER, etag, live_map, sign
from region.model import RegionMap

from . import __version__
from .config import RelayConfig
from .keys import NodeKey
from .metrics import CONTENT_TYPE, relay_registry, render
from .server import RelayServer
from .stun_server import StunStats

if TYPE_CHECKING:
    from coordinator.state import MeshState

    from .mesh import Mesh
    from .supervisor import Supervisor

__all__ = ["HttpStats", "create_app", "serve_app"]

log = logging.getLogger(__name__)

#: accept() errors that mean "out of descriptors or memory for now", not "broken".
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: How long to wait before accepting again after such an error.
_ACCEPT_PAUSE_S = 0.1


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
) -> QuartTrio:
    app = QuartTrio("relaymesh")

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

    registry = relay_registry(
        server,
        state=state,
        mesh=mesh,
        supervisor=supervisor,
        http_stats=http_stats,
        stun_stats=stun_stats,
    )
    started = time.time()

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

    @app.get("/api/v1/peers/<node_key>")
    async def peer(node_key: str) -> tuple[dict[str, Any], int]:
        """Where this relay would send a packet for ``node_key``, and why."""
        try:
            raw = NodeKey.parse(node_key).raw
        except ValueError as exc:
            return {"error": str(exc)}, 400
        hello = server.client_hello(NodeKey(raw))
        entry = state.peers.get(raw) if state is not None else None
        if hello is None and entry is None:
            return {"node_key": node_key, "local": False, "known": False}, 404
        record = asdict(entry.record) if entry is not None else None
        return {
            "node_key": node_key,
            "local": hello is not None,
            "known": entry is not None,
            "state": entry.state.value if entry is not None else None,
            "record": record,
            "disco_key": hello.disco_key if hello is not None else (record or {}).get("disco_key"),
            "endpoints": list(hello.endpoints)
            if hello is not None
            else (record or {}).get("endpoints", []),
        }, 200

    @app.get("/api/v1/status")
    async def status() -> dict[str, Any]:
        stats = server.statistics()
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
                "packets_in": stats.packets_in,
                "packets_out": stats.packets_out,
                "bytes_in": stats.bytes_in,
                "bytes_out": stats.bytes_out,
                "drops": stats.drops,
                "closes": stats.closes,
                "forwarded_in": stats.forwarded_in,
            },
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

    return app


@dataclass
class HttpStats:
    #: Connections accepted.
    connections: int = 0
    #: Connections that ended in an unexpected exception (each closed, nothing else).
    errors: int = 0


async def serve_app(
    app: QuartTrio,
    sock: trio.socket.SocketType,
    *,
    stats: HttpStats | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``sock`` (bound and listening) until cancelled; started() at once.

    The socket is the caller's: it stays open when this returns, so a restart
    serves the same port with no window in which another process could take it.
    """
    stats = stats if stats is not None else HttpStats()
    config = HypercornConfig()
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    asgi = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(asgi, config, lifespan_state)
    context = WorkerContext(None)
    listener = trio.SocketListener(sock)

    async def connection(stream: trio.SocketStream) -> None:
        try:
            # Annotated as an SSLStream, TCPServer serves a plain one too (as hypercorn does).
            state = ConnectionState(lifespan_state.copy())
            await TCPServer(asgi, config, context, state, stream).run()  # type: ignore[arg-type]
        except Exception as exc:
            stats.errors += 1
            n = stats.errors
            if n & (n - 1) == 0:  # the 1st, 2nd, 4th...: a flood cannot flood the log
                log.error(
                    "HTTP connection ended in an error (%d so far): %r",
                    n,
                    exc,
                    exc_info=exc if n == 1 else None,
                )
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("HTTP accept: %s; pausing %g s", exc, _ACCEPT_PAUSE_S)
                    await trio.sleep(_ACCEPT_PAUSE_S)
                    continue
                stats.connections += 1
                connections.start_soon(connection, stream)
