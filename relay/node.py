"""serve_relay_node(cfg): one nursery running everything a relay node runs.

Today that is the WebSocket data plane (relay/server.py) and the HTTP API
(relay/app.py on hypercorn). Both share the node's lifetime: cancel the node
and both stop. :func:`shutdown_gracefully` tells clients to move before the
node goes (Restarting frames), then stops it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .app import create_app
from .config import RelayConfig, load_tokens
from .keys import NodeKey, PrivateKey, load_or_create_key_file
from .server import RelayServer

__all__ = ["NodeInfo", "load_node_key", "serve_relay_node"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    region: str
    name: str
    public_key: NodeKey
    ws_url: str
    http_url: str
    server: RelayServer


def load_node_key(cfg: RelayConfig) -> PrivateKey:
    if cfg.relay.key_file is None:
        return PrivateKey.generate()
    return load_or_create_key_file(cfg.relay.key_file)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def serve_relay_node(
    cfg: RelayConfig,
    *,
    key: PrivateKey | None = None,
    mesh_key: bytes | None = None,
    task_status: trio.TaskStatus[NodeInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one relay node until cancelled; started() with its URLs once both ports accept."""
    key = key or load_node_key(cfg)
    tokens = (
        load_tokens(cfg.admission.tokens_file)
        if cfg.admission.policy == "token" and cfg.admission.tokens_file is not None
        else frozenset()
    )
    server = RelayServer(cfg, key, tokens=tokens, mesh_key=mesh_key)
    host = cfg.relay.listen_host
    hconfig = HypercornConfig()
    hconfig.bind = [f"{f'[{host}]' if ':' in host else host}:{cfg.relay.http_port}"]
    hconfig.accesslog = None
    hconfig.errorlog = logging.getLogger("hypercorn.error")
    hconfig.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        ws_port = await nursery.start(server.serve, host, cfg.relay.port)
        binds = await nursery.start(hypercorn_serve, create_app(cfg, server), hconfig)
        http_port = int(str(binds[0]).rsplit(":", 1)[1])
        uhost = _url_host(host)
        info = NodeInfo(
            region=cfg.relay.region,
            name=cfg.relay.name,
            public_key=key.public,
            ws_url=f"ws://{uhost}:{ws_port}/derp",
            http_url=f"http://{uhost}:{http_port}",
            server=server,
        )
        log.info(
            "relay %s/%s up: %s %s key %s",
            info.region,
            info.name,
            info.ws_url,
            info.http_url,
            info.public_key,
        )
        task_status.started(info)
