"""serve_relay_node(cfg): one nursery running everything a relay node runs.

Components, each under the node's :class:`~relay.supervisor.Supervisor`:

- ``websocket``: the WebSocket data plane (relay/server.py);
- ``http``: the HTTP API (relay/app.py, served by relay/http.py on hypercorn);
- ``stun``: the STUN server (relay/stun_server.py);
- with shared state (etcd endpoints in the config, or a store handed in by
  ``relaymesh up``): ``state``, the registration, the peer-map cache and the
  presence of local clients (coordinator/state.py), and, with a mesh key,
  ``mesh``, the mesh links (relay/mesh.py);
- ``health``: tells clients (Health frames) when the node is degraded.

A component that fails once started is logged, counted and restarted with
backoff (relay/supervisor.py); listeners come back on the ports they had.
The node itself ends only if a component cannot start (a port taken, a bad
configuration: the error is raised as itself, for the operator) or when it
is cancelled, which stops everything.

The components do not call each other's code in their own tasks. The
server reports client presence on a coalescing queue that the state drains
(``server.watch_presence()``); the state announces relay-table changes on a
one-slot channel the mesh drains (``state.open_relay_updates()``); the only
direct call is the hot path, the mesh's ``forward`` registered with
``server.add_forwarder``, and the server contains its exceptions.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from nacl.signing import SigningKey
from quart_trio import QuartTrio

from coordinator.registry import RelayRecord
from coordinator.state import MeshState
from coordinator.store import LeaseNotFound, Store, StoreUnavailable
from region.model import RegionMap, RegionMapError, load_region_map
from relay.protocol.keys import NodeKey, PrivateKey, load_or_create_key_file

from . import __version__
from .addresses import RelayAddresses, relay_addresses
from .app import create_app
from .config import ConfigError, RelayConfig, load_tokens
from .http import HttpStats, serve_app
from .mesh import Mesh
from .monitor import MeshMonitor
from .server import RelayServer
from .stun_server import StunStats, serve_stun
from .supervisor import Supervisor
from .tls import ServerTLS, TLSError, client_context

__all__ = ["ListenError", "NodeInfo", "load_node_key", "serve_relay_node", "shut_down_node"]

log = logging.getLogger(__name__)

#: Pending connections on the HTTP listening socket.
_HTTP_BACKLOG = 128


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    relay_id: str
    region: str
    name: str
    public_key: NodeKey
    ws_url: str
    http_url: str
    server: RelayServer
    state: MeshState | None
    mesh: Mesh | None
    supervisor: Supervisor
    stun_port: int = 0
    monitor: MeshMonitor | None = None
    #: Where relays and where clients reach this node (relay/addresses.py).
    addresses: RelayAddresses | None = None
    #: The certificate both ports serve ([tls]); reload() it on SIGHUP.
    tls: ServerTLS | None = None


class ListenError(Exception):
    """A port could not be bound; the message names the address and what it was for."""


@asynccontextmanager
async def _binding(role: str, host: str, port: int) -> AsyncIterator[None]:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        yield
    except OSError as exc:
        raise ListenError(f"cannot listen on {where} ({role}): {exc.strerror or exc}") from None
    except BaseExceptionGroup as group:
        # The servers bind inside their own nurseries: the OSError may come grouped.
        errors, _ = group.split(OSError)
        if errors is None:
            raise
        first: BaseException = errors
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        reason = first.strerror if isinstance(first, OSError) and first.strerror else str(first)
        raise ListenError(f"cannot listen on {where} ({role}): {reason}") from None


def load_node_key(cfg: RelayConfig) -> PrivateKey:
    if cfg.relay.key_file is None:
        return PrivateKey.generate()
    return load_or_create_key_file(cfg.relay.key_file)


@asynccontextmanager
async def _store_from_config(cfg: RelayConfig) -> AsyncIterator[Store | None]:
    if not cfg.mesh.etcd_endpoints:
        yield None
        return
    from coordinator.etcd import open_etcd_store

    async with open_etcd_store(cfg.mesh.etcd_endpoints, **_etcd_options(cfg)) as store:
        yield store


def _etcd_options(cfg: RelayConfig) -> dict[str, Any]:
    """TLS and authentication for etcd ([etcd]); the password is read here, never logged."""
    e = cfg.etcd
    if any(ep.startswith("https://") for ep in cfg.mesh.etcd_endpoints) and e.ca_file is None:
        raise ConfigError("[mesh] etcd_endpoints use https://: set [etcd] ca_file")
    options: dict[str, Any] = {
        name: str(path)
        for name, path in (
            ("ca_file", e.ca_file),
            ("cert_file", e.cert_file),
            ("key_file", e.key_file),
        )
        if path is not None
    }
    if e.user is not None and e.password_file is not None:
        try:
            password = e.password_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"{e.password_file}: cannot read the etcd password: {exc.strerror}"
            ) from None
        options.update(user=e.user, password=password)
    return options


async def serve_relay_node(
    cfg: RelayConfig,
    *,
    key: PrivateKey | None = None,
    store: Store | None = None,
    mesh_key: bytes | None = None,
    task_status: trio.TaskStatus[NodeInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one relay node until cancelled; started() with its URLs once both ports accept.

    ``store`` overrides the config's etcd endpoints (``relaymesh up`` shares one
    MemoryStore between the relays of one process).
    """
    key = key or load_node_key(cfg)
    tls, relay_trust = _load_tls(cfg)
    server = RelayServer(cfg, key, tokens=_admission_tokens(cfg), mesh_key=mesh_key, tls=tls)
    host = cfg.relay.listen_host
    configured_map, signing_key = _load_region_map_config(cfg)
    supervisor = Supervisor()
    started = False
    try:
        async with _binding("HTTP", host, cfg.relay.http_port):
            http_sock = await _listen_tcp(host, cfg.relay.http_port)
        with http_sock:
            async with trio.open_nursery() as nursery:
                ws_port = await _start_websocket(nursery, supervisor, server, cfg)
                stun_stats = StunStats()
                stun_port = await _start_stun(nursery, supervisor, cfg, stun_stats)
                addr = relay_addresses(
                    cfg,
                    ws_port=ws_port,
                    http_port=http_sock.getsockname()[1],
                    stun_port=stun_port,
                    tls=tls is not None,
                )
                server.http_url = addr.client_http_url
                me = _relay_record(cfg, key, addr)
                async with _store_from_config(cfg) if store is None else _given(store) as the_store:
                    state, mesh = _shared_state(
                        cfg, the_store, me, server, key, mesh_key, relay_trust
                    )

                    def relays() -> list[RelayRecord]:
                        return list(state.relays.values()) if state is not None else [me]

                    monitor = _mesh_monitor(
                        cfg, me, relays, configured_map, state, server, relay_trust
                    )
                    http_stats = HttpStats()
                    app = create_app(
                        cfg,
                        server,
                        state=state,
                        mesh=mesh,
                        relays=relays,
                        region_map=configured_map,
                        signing_key=signing_key,
                        stun_stats=stun_stats,
                        http_stats=http_stats,
                        supervisor=supervisor,
                        monitor=monitor,
                        mesh_key=mesh_key,
                    )
                    await _start_http(nursery, supervisor, cfg, app, http_sock, http_stats, tls)
                    await _start_shared_state(nursery, supervisor, server, state, mesh, monitor)
                    info = NodeInfo(
                        relay_id=cfg.relay.name,
                        region=cfg.relay.region,
                        name=cfg.relay.name,
                        public_key=key.public,
                        ws_url=me.ws_url,
                        http_url=me.http_url,
                        server=server,
                        state=state,
                        mesh=mesh,
                        supervisor=supervisor,
                        stun_port=stun_port,
                        monitor=monitor,
                        addresses=addr,
                        tls=tls,
                    )
                    log.info(
                        "relay %s/%s up: %s %s key %s",
                        info.region,
                        info.name,
                        info.ws_url,
                        info.http_url,
                        info.public_key,
                    )
                    started = True
                    task_status.started(info)
                    await trio.sleep_forever()
    except BaseExceptionGroup as group:
        # A component that cannot start ends the node with its own error, ungrouped,
        # so that the operator reads one line (a port taken, a bad configuration).
        if not started:
            leaves = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
            if len(leaves) == 1 and isinstance(leaves[0], Exception):
                raise leaves[0] from None
        raise


def _admission_tokens(cfg: RelayConfig) -> frozenset[str]:
    if cfg.admission.policy == "token" and cfg.admission.tokens_file is not None:
        return load_tokens(cfg.admission.tokens_file)
    return frozenset()


async def _start_websocket(
    nursery: trio.Nursery, supervisor: Supervisor, server: RelayServer, cfg: RelayConfig
) -> int:
    """The data plane, supervised; returns the port it accepts on."""
    host = cfg.relay.listen_host

    def serve_ws(task_status: trio.TaskStatus[int]) -> Any:
        # A restart listens on the port the first run got.
        port = server.port if server.port is not None else cfg.relay.port
        return server.serve(host, port, task_status=task_status)

    async with _binding("WebSocket", host, cfg.relay.port):
        port: int = await supervisor.start(nursery, "websocket", serve_ws)
    return port


async def _start_stun(
    nursery: trio.Nursery, supervisor: Supervisor, cfg: RelayConfig, stats: StunStats
) -> int:
    """The STUN server, supervised, if configured; returns its port (0: none)."""
    if not cfg.relay.stun:
        return 0
    host = cfg.relay.listen_host
    stun_box = [cfg.relay.stun_port]

    def run_stun(task_status: trio.TaskStatus[int]) -> Any:
        return serve_stun(host, stun_box[0], stats=stats, task_status=task_status)

    async with _binding("STUN, UDP", host, cfg.relay.stun_port):
        stun_box[0] = await supervisor.start(nursery, "stun", run_stun)
    return stun_box[0]


def _relay_record(cfg: RelayConfig, key: PrivateKey, addr: RelayAddresses) -> RelayRecord:
    """This relay as the registry publishes it, with the addresses others reach it at."""
    return RelayRecord(
        relay_id=cfg.relay.name,
        region=cfg.relay.region,
        name=cfg.relay.name,
        ws_url=addr.ws_url,
        http_url=addr.http_url,
        public_key=str(key.public),
        started_at=time.time(),
        version=__version__,
        stun=addr.stun,
        public_ws_url=addr.client_ws_url if addr.public else None,
        public_http_url=addr.client_http_url if addr.public else None,
        public_stun=addr.client_stun if addr.public else None,
    )


def _shared_state(
    cfg: RelayConfig,
    store: Store | None,
    me: RelayRecord,
    server: RelayServer,
    key: PrivateKey,
    mesh_key: bytes | None,
    relay_trust: ssl.SSLContext,
) -> tuple[MeshState | None, Mesh | None]:
    """The state over ``store`` (none without one) and, with a mesh key, the mesh."""
    if store is None:
        return None, None
    state = MeshState(
        store,
        me,
        prefix=cfg.mesh.prefix,
        lease_ttl_s=cfg.mesh.lease_ttl_s,
        keepalive_interval_s=cfg.mesh.keepalive_interval_s,
        lost_grace_s=cfg.mesh.lost_grace_s,
        presence=server.watch_presence(),
    )
    if mesh_key is None:
        return state, None
    mesh = Mesh(
        server,
        state,
        key,
        mesh_key,
        link_idle_s=cfg.mesh.link_idle_s,
        link_queue_packets=cfg.mesh.link_queue_packets,
        link_queue_bytes=cfg.mesh.link_queue_bytes,
        ssl_context=relay_trust,
    )
    return state, mesh


def _mesh_monitor(
    cfg: RelayConfig,
    me: RelayRecord,
    relays: Callable[[], list[RelayRecord]],
    configured_map: RegionMap | None,
    state: MeshState | None,
    server: RelayServer,
    relay_trust: ssl.SSLContext,
) -> MeshMonitor | None:
    if not cfg.health.enabled:
        return None

    def homes() -> Iterable[tuple[bytes, str]]:
        # Lost peers keep their last relay: coming back elsewhere is a move.
        assert state is not None
        return ((k, e.record.relay_id) for k, e in state.peers.items())

    return MeshMonitor(
        cfg.health,
        me=lambda: me,
        relays=relays,
        regions=[r.code for r in configured_map.regions] if configured_map is not None else None,
        homes=homes if state is not None else None,
        departed=(lambda: state.departed) if state is not None else None,
        probe_key=server.probe_key,
        ssl_context=relay_trust,
    )


async def _start_http(
    nursery: trio.Nursery,
    supervisor: Supervisor,
    cfg: RelayConfig,
    app: QuartTrio,
    sock: trio.socket.SocketType,
    stats: HttpStats,
    tls: ServerTLS | None,
) -> None:
    """The HTTP API on the node's own socket and, with TLS, the certificate's reloader."""
    await supervisor.start(
        nursery,
        "http",
        partial(
            serve_app,
            app,
            sock,
            stats=stats,
            tls=tls,
            tls_handshake_timeout_s=cfg.tls.handshake_timeout_s,
        ),
    )
    if tls is not None and cfg.tls.reload_check_interval_s > 0:
        await supervisor.start(nursery, "tls", partial(tls.watch, cfg.tls.reload_check_interval_s))


async def _start_shared_state(
    nursery: trio.Nursery,
    supervisor: Supervisor,
    server: RelayServer,
    state: MeshState | None,
    mesh: Mesh | None,
    monitor: MeshMonitor | None,
) -> None:
    """The components after HTTP, in order: state, mesh, health, monitor."""
    if state is not None:
        await supervisor.start(nursery, "state", state.run)
        if mesh is not None:
            await supervisor.start(nursery, "mesh", mesh.run)
        await supervisor.start(nursery, "health", partial(_report_health, server, state))
    if monitor is not None:
        await supervisor.start(nursery, "monitor", monitor.run)


async def shut_down_node(info: NodeInfo, *, deadline_s: float) -> None:
    """A planned stop, within ``deadline_s``; the caller then cancels the node.

    0. The relay's registry record says it is leaving, so the mesh's health
       shows the stop as a departure, not as a relay down (docs/health.md).
    1. Every client gets Restarting; those that know other relays move at once,
       while this relay still delivers to them and forwards for them.
    2. The writers of those still here flush; each connection is closed with
       1001 (going away), so clients fail over at once instead of timing out.
    3. The relay deregisters: its lease is revoked, which removes its record and
       the peers still published under it. This comes last on purpose: while
       clients are moving, other relays must still route to the ones here.
    """
    close_s = min(1.0, deadline_s / 4)
    revoke_s = min(1.0, deadline_s / 4)
    start = trio.current_time()
    with trio.move_on_after(deadline_s):
        state = info.state
        if state is not None:
            with trio.move_on_after(revoke_s):
                try:
                    await state.announce_leaving()
                except (StoreUnavailable, LeaseNotFound) as exc:
                    log.info("could not announce the stop (it will look like a failure): %s", exc)
        spent = trio.current_time() - start
        await info.server.drain(
            reconnect_in_ms=0, grace_s=deadline_s - spent - close_s - revoke_s, close_s=close_s
        )
        if state is not None and state.registered:
            with trio.move_on_after(revoke_s):
                try:
                    await state.store.revoke(state.lease)
                except (StoreUnavailable, LeaseNotFound) as exc:
                    log.info("could not deregister (the lease will expire): %s", exc)


async def _listen_tcp(host: str, port: int) -> trio.socket.SocketType:
    """A listening TCP socket; OSError (EADDRINUSE...) if the port cannot be had."""
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind((host, port))
        sock.listen(_HTTP_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _load_tls(cfg: RelayConfig) -> tuple[ServerTLS | None, ssl.SSLContext]:
    """The certificate to serve ([tls]) and what other relays are verified with ([mesh])."""
    try:
        tls = None
        if cfg.tls.cert_file is not None and cfg.tls.key_file is not None:
            tls = ServerTLS(cfg.tls.cert_file, cfg.tls.key_file)
        return tls, client_context(cfg.mesh.ca_file)
    except TLSError as exc:
        raise ConfigError(str(exc)) from None


def _load_region_map_config(cfg: RelayConfig) -> tuple[RegionMap | None, SigningKey | None]:
    rm = cfg.region_map
    configured = None
    if rm.file is not None:
        try:
            configured = load_region_map(rm.file)
        except RegionMapError as exc:
            raise ConfigError(str(exc)) from None
    signing_key = None
    if rm.signing_key_file is not None:
        try:
            seed = bytes.fromhex(rm.signing_key_file.read_text().strip())
            signing_key = SigningKey(seed)
        except OSError as exc:
            raise ConfigError(f"{rm.signing_key_file}: cannot read: {exc.strerror}") from None
        except (ValueError, TypeError):
            raise ConfigError(
                f"{rm.signing_key_file}: an Ed25519 signing key is 64 hex digits"
            ) from None
    return configured, signing_key


@asynccontextmanager
async def _given(store: Store) -> AsyncIterator[Store]:
    yield store


async def _report_health(
    server: RelayServer, state: MeshState, *, task_status: trio.TaskStatus[None]
) -> None:
    """Tell clients when this relay is degraded, and when it is well again."""
    task_status.started()
    await state.wait_registered()
    told = ""
    while True:
        now = state.degraded or ""
        if now != told:
            server.broadcast_health(now)
            told = now
        await trio.sleep(0.5)
