"""The relay's HTTP API: ``create_app(cfg, server)`` for hypercorn + quart-trio.

Served next to the WebSocket data plane, on its own port, inside the node's
nursery (see relay/node.py). Endpoints:

- ``/healthz``: 200 "ok" while the process serves (liveness).
- ``/metrics``: Prometheus text exposition (relay/metrics.py).
- ``/api/v1/status``: JSON for the dashboard and scripts.
- ``/generate_204`` and ``/derp/latency-check``: empty answers for latency probes.
"""

from __future__ import annotations

import time
from typing import Any

from quart import Response
from quart_trio import QuartTrio

from . import __version__
from .config import RelayConfig
from .metrics import CONTENT_TYPE, relay_registry, render
from .server import RelayServer

__all__ = ["create_app"]


def create_app(cfg: RelayConfig, server: RelayServer) -> QuartTrio:
    app = QuartTrio("relaymesh")
    registry = relay_registry(server)
    started = time.time()

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
            },
        }

    return app
