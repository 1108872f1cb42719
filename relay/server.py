"""The relay server: accept clients over WebSocket, authenticate, route packets.

Theory of operation
-------------------
The relay owns its accept loop (:meth:`RelayServer._accept_loop`). At most
``max_preauth_connections`` connections may be in their upgrade or handshake at
once; at that cap a new connection from the source holding the most of them is
closed right after accept, and one from any other source takes the place of
that source's oldest (``_PreauthTable``). Each connection let in runs
:meth:`RelayServer._connection`, an error boundary around its whole life: a
task of its own runs the TLS handshake, the upgrade and the relay handshake
(one deadline from accept), then a nursery holding its reader task and writer
task. When one of them ends (peer closed,
bad frame, write timeout, replaced) it records why and cancels the nursery,
and the connection closes the WebSocket with that reason. Whatever escapes is
logged once, counted in ``closes`` and ends that connection only; every
accepted connection is counted there exactly once. No nursery outlives its
connection.

Routing itself is synchronous, and works on runs: the reader of client X
takes its frames a turn at a time, and consecutive SendPackets to Y come out
of the decoder as one run, already turned into RecvPacket frames in place
(same length: the 32-byte destination key is swapped for X's key) and copied
once (``wire.FrameDecoder.relay_split``). The reader looks Y up once per run
and appends the run to Y's bounded data queue as one entry, whose bounds
still count packets. Y's writer wakes, takes everything queued (control
frames first, then data up to ``max_message_bytes``) and sends it as one
WebSocket message. Coalescing is what makes small packets cheap: the
per-message cost of the WebSocket layer is paid once per batch, and the
routing cost once per run, not once per packet.

Flow control: after each turn (at most ``frames_per_turn`` frames) the reader
looks at the queues it fed: Y's, or the mesh link's towards Y's relay
(``PacketForwarder.gate``), or, on a mesh link, the local clients it
delivered to. While one of them is at or over its high-water mark the reader
reads nothing more (TCP slows X) until Y's writer has taken it down to the
low-water mark, each wait bounded by ``flow_wait_s``. A queue whose writer
took nothing during a whole wait (Y reads nothing) is marked stuck and not
waited on again until its writer moves: its packets fall back to the drops.
If Y's queue is full anyway the oldest queued entries (a packet, or a run)
are dropped, every packet in them counted; if Y is already closing the new
ones are. Every drop is counted under a
:class:`DropReason`, and the sender, if it is a client of this relay, is told
in a PacketsDropped frame (at most one per reason per
``drop_report_interval_s``).

A per-client token bucket (``rate_bytes_per_s``) slows the *reader* of a
client that sends too fast, which pushes back through TCP instead of dropping.
"""

from __future__ import annotations

import enum
import errno
import hmac
import ipaddress
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from wsproto import ConnectionType
from wsproto.handshake import H11Handshake

from coordinator.presence import Presence, PresenceQueue
from relay.protocol import wire
from relay.protocol.handshake import (
    ClientHello,
    mesh_proof,
    new_challenge,
    open_client_info,
    seal_server_info,
)
from relay.protocol.keys import NodeKey, PrivateKey
from relay.protocol.wire import (
    CloseReason,
    DropCode,
    FrameType,
    ProtocolError,
    RemoteProtocolError,
)

from .config import RelayConfig
from .queue import ByteBudget, Drop, FrameQueue, Outbox
from .ratelimit import TokenBucket
from .tls import ServerTLS, describe_tls_error
from .wsstream import (
    HandshakeFailed,
    WebSocketClosed,
    WebSocketStream,
    accept_upgrade,
    read_upgrade_request,
    reject_upgrade,
)

__all__ = [
    "ClientStats",
    "DropReason",
    "PacketForwarder",
    "RelayServer",
    "RelayStats",
    "serve_relay",
]

log = logging.getLogger(__name__)

_HDR = wire.FRAME_HEADER
_RECV = FrameType.RECV_PACKET
_SEND = FrameType.SEND_PACKET
_FWD = FrameType.FORWARD_PACKET
_FWDS = FrameType.FORWARD_PACKETS
_FWDR = FrameType.FORWARD_RUN
_K = wire.KEY_BYTES
#: What a SendPacket or RecvPacket frame holds besides its payload: header and key.
_PACKET_OVERHEAD = wire.HEADER_BYTES + _K
_PONG_HEADER = wire.frame_header(FrameType.PONG, wire.PING_BYTES)
#: How long a close handshake may take before the socket is just closed.
_CLOSE_TIMEOUT_S = 2.0
#: Against the pre-auth budget, a WebSocket frame that carries nothing counts as this
#: many bytes: at most 128 of them before a ClientInfo.
_NOOP_FRAME_BYTES = 64
#: Remember at most this many recent senders per client (for PeerGone on disconnect).
_MAX_SENDERS_TRACKED = 4096
#: A failing forwarder is logged at most this often (every failure is counted).
_FORWARD_ERROR_LOG_INTERVAL_S = 10.0
#: accept() errors that mean "out of descriptors or memory for now", not "broken".
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: accept() errors about that one connection only (the peer gave up first): accept the
#: next. The list trio.SocketListener ignores.
_ACCEPT_IGNORED_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "ECONNRESET",
        "EHOSTDOWN",
        "EHOSTUNREACH",
        "ENETDOWN",
        "ENETUNREACH",
        "ENONET",
        "ENOPROTOOPT",
        "ENOSR",
        "EOPNOTSUPP",
        "EPERM",
        "EPROTO",
        "EPROTONOSUPPORT",
        "ESOCKTNOSUPPORT",
        "ETIMEDOUT",
    )
    if hasattr(errno, name)
)
#: How long to wait before accepting again after such an error.
_ACCEPT_PAUSE_S = 0.1
#: Failing accepts are logged at most this often (every failure is counted).
_ACCEPT_ERROR_LOG_INTERVAL_S = 10.0


class DropReason(enum.Enum):
    #: The destination's queue held send_queue_packets: its oldest packet was dropped.
    QUEUE_FULL = "queue_full"
    #: The destination's queue held send_queue_bytes: its oldest packets were dropped.
    QUEUE_BYTES_FULL = "queue_bytes_full"
    #: All clients' queues together held total_queue_bytes: the new packet was dropped.
    RELAY_QUEUE_FULL = "relay_queue_full"
    #: No client with that key is connected here.
    UNKNOWN_DEST = "unknown_dest"
    #: The destination was closing; the packet arrived too late.
    DEST_CLOSING = "dest_closing"
    #: Still queued when the destination disconnected.
    DISCONNECTED = "disconnected"
    #: A control frame (pong, peer gone) did not fit the control queue.
    CONTROL_QUEUE_FULL = "control_queue_full"
    #: Another relay forwarded a packet for a client that is not (or no longer) here.
    MESH_NOT_HERE = "mesh_not_here"
    #: The mesh link towards the destination's relay had a full queue.
    MESH_QUEUE_FULL = "mesh_queue_full"
    #: The forwarder raised instead of taking or refusing the packet.
    FORWARD_ERROR = "forward_error"


#: How the drops the data queues count themselves are reported.
_QUEUE_DROPS = {
    Drop.OLDEST_FOR_FRAMES: DropReason.QUEUE_FULL,
    Drop.OLDEST_FOR_BYTES: DropReason.QUEUE_BYTES_FULL,
    Drop.NEW_FOR_BUDGET: DropReason.RELAY_QUEUE_FULL,
}
#: How a drop is reported to the packet's sender (PacketsDropped).
_DROP_CODES = {
    Drop.OLDEST_FOR_FRAMES: DropCode.QUEUE_FULL,
    Drop.OLDEST_FOR_BYTES: DropCode.QUEUE_FULL,
    Drop.NEW_FOR_BUDGET: DropCode.RELAY_QUEUE_FULL,
    DropReason.QUEUE_FULL: DropCode.QUEUE_FULL,
    DropReason.QUEUE_BYTES_FULL: DropCode.QUEUE_FULL,
    DropReason.RELAY_QUEUE_FULL: DropCode.RELAY_QUEUE_FULL,
    DropReason.DEST_CLOSING: DropCode.DEST_CLOSING,
    DropReason.MESH_QUEUE_FULL: DropCode.MESH_QUEUE_FULL,
}


class PacketForwarder(Protocol):
    """Carries packets for keys not connected here (the mesh); see add_forwarder."""

    def forward_frames(self, src: bytes, dest: bytes, frames: bytes, count: int) -> bool:
        """Send a run of ``count`` packets from ``src`` to ``dest``, given as the
        RecvPacket frames ``dest`` is to get, towards the relay that holds ``dest``;
        False if none is known.

        Called on a reader's hot path: it must not block or await.
        """
        ...

    def report_drops(self, src: bytes, code: DropCode, count: int) -> bool:
        """Tell the relay that holds ``src`` that ``count`` packets it forwarded from
        ``src`` were dropped here (it tells ``src``); False if that cannot be done yet
        (the link there is still opening). Never blocks."""
        ...

    def gate(self, dest: bytes) -> Outbox | None:
        """The queue packets for ``dest`` wait in (a mesh link's), for flow control.

        Called once per run of packets to ``dest``; None if there is none.
        """
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientStats:
    key: str
    remote: str
    is_mesh: bool
    is_probe: bool
    preferred: bool
    connected_at: float
    data_queued: int
    data_capacity: int
    data_queued_bytes: int
    data_capacity_bytes: int
    control_queued: int
    packets_in: int
    bytes_in: int
    packets_out: int
    bytes_out: int
    messages_out: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayStats:
    #: Clients connected now: neither mesh peers nor the mesh's own probe clients.
    clients: int
    mesh_peers: int
    #: The health monitors' probe clients connected now (docs/health.md).
    probe_clients: int
    accepts: int
    handshakes_ok: int
    packets_in: int
    bytes_in: int
    packets_out: int
    bytes_out: int
    messages_out: int
    drops: dict[str, int]
    closes: dict[str, int]
    #: Bytes waiting in all clients' data queues now, and their bound (total_queue_bytes).
    queued_bytes: int
    queued_bytes_limit: int
    skipped_frames: int
    #: Seconds readers spent paused by the per-client rate limit.
    rate_limited_s: float
    #: Packets other relays forwarded to clients here.
    forwarded_in: int
    #: Seconds readers spent waiting for the queues they fed to drain (flow control).
    flow_waited_s: float
    #: Waits given up because the queue's writer took nothing (a receiver that reads nothing).
    flow_gave_up: int
    #: accept() failures by errno name (EMFILE: out of file descriptors), each waited out.
    accept_errors: dict[str, int]


class _Closing(Exception):
    """Raised inside a connection's tasks to end it with a reason."""

    def __init__(self, reason: CloseReason, detail: str, *, label: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        #: What ``closes`` counts it as, when not the reason's own label.
        self.label = label


#: What ``closes`` counts a connection as when its peer went away, by the stage it was in.
_GONE = {
    "tls": "tls_handshake_failed",
    "upgrade": "closed_before_upgrade",
    "handshake": "closed_in_handshake",
    "open": "closed_by_peer",
}


class _Conn:
    """One accepted TCP connection, from accept to close. Owned by its guard task,
    except ``shed``, set by whichever accept sheds it (see ``_PreauthTable``)."""

    __slots__ = ("closed_as", "over_budget", "remote", "scope", "shed", "source", "stage")

    def __init__(self, remote: str, source: str, preauth_deadline: float) -> None:
        self.remote = remote
        #: Where it came from, as the pre-auth cap groups connections (see ``_PreauthTable``).
        self.source = source
        #: The pre-auth phase (upgrade and handshake): its deadline, and shedding cancels it.
        self.scope = trio.CancelScope(deadline=preauth_deadline)
        self.stage = "upgrade"
        self.shed = False
        #: It sent more than it may before its ClientInfo: no longer read.
        self.over_budget = False
        #: The label it was counted under in ``closes``, once it was.
        self.closed_as: str | None = None


class _PreauthTable:
    """Connections that have not proved a key yet, oldest first, counted per source.

    At the cap (``max_preauth_connections``) the relay sheds from the source that
    holds the most pre-auth connections, never from a lighter one: a flood from one
    host (or a few) then only ever displaces itself, and a client from anywhere
    else takes one of the flood's places. A new connection from a source that
    already holds the most is refused instead (closed right after accept, before
    any task or WebSocket state exists): that keeps the kernel's accept queue
    draining at the speed of accept() and close(), so a client queued behind a
    flood waits for that, not for the relay to set up and shed each of the
    flood's connections. A source is an IPv4 address, or an IPv6 /64 (what one
    host is usually given). This is no per-source cap: below the cap any source
    may hold any number, and at the cap the heaviest one is the one that yields.
    """

    __slots__ = ("_by_source", "_cap", "_conns", "_heaviest", "_sources_holding")

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._conns: dict[_Conn, None] = {}
        self._by_source: Counter[str] = Counter()
        #: How many sources hold exactly k pre-auth connections, for each k > 0.
        self._sources_holding: Counter[int] = Counter()
        #: The most any one source holds.
        self._heaviest = 0

    def __len__(self) -> int:
        return len(self._conns)

    def refuses(self, source: str) -> bool:
        """At the cap, whether a new connection from ``source`` is refused: it holds the most."""
        return len(self._conns) >= self._cap and self._by_source[source] >= self._heaviest

    def add(self, conn: _Conn) -> None:
        """Hold ``conn``; at the cap, shed the oldest connection of the heaviest source."""
        while len(self._conns) >= self._cap:
            victim = next(c for c in self._conns if self._by_source[c.source] == self._heaviest)
            self.remove(victim)
            victim.shed = True
            victim.scope.cancel()
        self._conns[conn] = None
        n = self._by_source[conn.source] = self._by_source[conn.source] + 1
        if n > 1:
            self._sources_holding[n - 1] -= 1
        self._sources_holding[n] += 1
        self._heaviest = max(self._heaviest, n)

    def remove(self, conn: _Conn) -> None:
        """Forget ``conn`` (its handshake ended, one way or the other); no-op if not held."""
        if conn not in self._conns:
            return
        del self._conns[conn]
        n = self._by_source[conn.source]
        if n == 1:
            del self._by_source[conn.source]
        else:
            self._by_source[conn.source] = n - 1
            self._sources_holding[n - 1] += 1
        self._sources_holding[n] -= 1
        if n == self._heaviest and self._sources_holding[n] == 0:
            self._heaviest = n - 1


class _PatientListener:
    """A listening socket whose accept() waits out running out of descriptors or memory.

    It hands back the bare socket and the peer's address (what accept() gives):
    a connection the pre-auth cap refuses costs accept() and close() only, not
    a ``trio.SocketStream``'s socket options. ``trio.serve_listeners`` would
    wait too, but it logs a traceback on every try (ten a second) and counts
    nothing; this reports each failure to ``on_error``.
    """

    def __init__(self, inner: trio.SocketListener, on_error: Callable[[OSError], None]) -> None:
        self.inner = inner
        self._on_error = on_error

    async def accept(self) -> tuple[trio.socket.SocketType, Any]:
        while True:
            try:
                return await self.inner.socket.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_IGNORED_ERRNOS:
                    # The peer gave up before we got to it (as trio.SocketListener does).
                    continue
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                self._on_error(exc)
                await trio.sleep(_ACCEPT_PAUSE_S)

    async def __aenter__(self) -> _PatientListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inner.aclose()


def _peer(addr: Any) -> tuple[str, str]:
    """``ip:port`` of a peer from its address as accept() gives it, and its source as
    the pre-auth cap groups peers: the IPv4 address, or the IPv6 /64."""
    host, port = addr[0], addr[1]
    if ":" not in host:
        return f"{host}:{port}", host
    ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    if ip.ipv4_mapped is not None:
        return f"[{host}]:{port}", str(ip.ipv4_mapped)
    return f"[{host}]:{port}", str(ipaddress.IPv6Network((ip, 64), strict=False))


_PEER_GONE = (WebSocketClosed, trio.BrokenResourceError, trio.ClosedResourceError)


def _peer_went_away(exc: BaseException) -> bool:
    """Whether ``exc`` (or every exception in a group) only says the peer is gone."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_peer_went_away(e) for e in exc.exceptions)
    return isinstance(exc, _PEER_GONE)


class _Client:
    """One authenticated connection."""

    def __init__(
        self,
        ws: WebSocketStream,
        hello: ClientHello,
        remote: str,
        *,
        is_mesh: bool,
        out: Outbox,
    ) -> None:
        # Fixed once the handshake is done.
        self.ws = ws
        self.key = hello.client_key.raw
        self.node_key = hello.client_key
        self.remote = remote
        self.is_mesh = is_mesh
        self.is_probe = hello.probe
        self.connected_at = trio.current_time()
        self.cancel_scope = trio.CancelScope()
        # Queued to by any reader task (routing); drained by this client's writer.
        self.out = out
        self.closing = False
        self.senders: set[bytes] = set()
        #: Its packets dropped here since it was last told, by reason (see _report_drop).
        self.drops_unreported: Counter[DropCode] = Counter()
        # Owned by this client's reader task.
        self.preferred = hello.preferred
        self.hello = hello
        self.gone_notified: dict[bytes, float] = {}
        self.packets_in = 0
        self.bytes_in = 0
        # Owned by this client's writer task.
        self.packets_out = 0
        self.bytes_out = 0
        self.messages_out = 0
        # Set by whoever ends the connection first.
        self.close_reason: CloseReason | None = None
        self.close_detail = ""
        # Set by the connection's handler once its close frame went out (or could not).
        self.closed = trio.Event()

    def end(self, reason: CloseReason, detail: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
            self.close_detail = detail
        self.closing = True
        self.cancel_scope.cancel()

    def stats(self) -> ClientStats:
        data, ctrl = self.out.data, self.out.control
        return ClientStats(
            key=str(self.node_key),
            remote=self.remote,
            is_mesh=self.is_mesh,
            is_probe=self.is_probe,
            preferred=self.preferred,
            connected_at=self.connected_at,
            data_queued=len(data),
            data_capacity=data.max_frames,
            data_queued_bytes=data.bytes,
            data_capacity_bytes=data.max_bytes,
            control_queued=len(ctrl),
            packets_in=self.packets_in,
            bytes_in=self.bytes_in,
            packets_out=self.packets_out,
            bytes_out=self.bytes_out,
            messages_out=self.messages_out,
        )


@dataclass
class _Counters:
    accepts: int = 0
    handshakes_ok: int = 0
    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    messages_out: int = 0
    skipped_frames: int = 0
    forwarded_in: int = 0
    rate_limited_s: float = 0.0
    flow_waited_s: float = 0.0
    flow_gave_up: int = 0
    drops: Counter[DropReason] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    accept_errors: Counter[str] = field(default_factory=Counter)


class RelayServer:
    """Routes packets between the clients connected to one relay."""

    def __init__(
        self,
        cfg: RelayConfig,
        key: PrivateKey,
        *,
        tokens: frozenset[str] = frozenset(),
        mesh_key: bytes | None = None,
        tls: ServerTLS | None = None,
    ) -> None:
        self.cfg = cfg
        self.key = key
        #: With a certificate, every connection speaks TLS (wss://) from its first byte.
        self.tls = tls
        self._limits = cfg.limits
        self._tokens = tokens
        self._mesh_key = mesh_key
        #: What the mesh's probe clients prove themselves with: the mesh key, or
        #: without one a secret of this process (only its own monitor probes it then).
        self.probe_key = mesh_key if mesh_key is not None else secrets.token_bytes(32)
        #: The relay's HTTP base as clients reach it (its region map, its status), told to
        #: every client in ServerInfo; set by the node once its HTTP port is bound.
        self.http_url: str | None = None
        self._clients: dict[bytes, _Client] = {}
        #: What all clients' data queues hold together, and what they dropped (by Drop).
        self._queued = ByteBudget(cfg.limits.total_queue_bytes)
        self._queue_drops: Counter[Drop] = Counter()
        #: Connections that have not finished their handshake, oldest first.
        self._preauth = _PreauthTable(self._limits.max_preauth_connections)
        self._c = _Counters()
        self.port: int | None = None
        # Set by watch_presence(): where client (dis)connects are reported.
        self._presence: PresenceQueue | None = None
        # Set by add_forwarder(): who carries packets for keys not connected here.
        self._forwarder: PacketForwarder | None = None
        self._forward_error_logged_at = -_FORWARD_ERROR_LOG_INTERVAL_S
        #: Clients with drops to be told about, and the event that wakes the reporter.
        self._drops_unreported: dict[_Client, None] = {}
        self._drops_to_report = trio.Event()
        #: Drops of packets forwarded here from clients of other relays, by source, to be
        #: told to their relays (at most _MAX_SENDERS_TRACKED sources per interval).
        self._remote_drops: dict[bytes, Counter[DropCode]] = {}
        self._accept_error_logged_at = -_ACCEPT_ERROR_LOG_INTERVAL_S
        #: Set once drain() has begun: the relay is on its way out.
        self.draining = False

    # ---- public surface -------------------------------------------------

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept WebSocket clients on ``host:port`` until cancelled; started() with the port.

        Our own accept loop rather than a WebSocket library's server: see
        :meth:`_connection` and docs/architecture.md. Out of file descriptors
        (EMFILE, ENFILE) or memory, accept waits and tries again every 100 ms, each
        failure counted in ``accept_errors``: connections already open are served
        meanwhile, and accepting resumes as soon as one closes.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_drops)
            nursery.start_soon(self._watch_writes)
            for listener in listeners:
                patient = _PatientListener(listener, self._accept_failed)
                nursery.start_soon(self._accept_loop, patient, nursery)
            task_status.started(self.port)

    async def _watch_writes(self) -> None:
        """End every client whose current send has made no progress for more than
        ``write_timeout_s`` (its socket took nothing for that long; over TLS, its send
        took that long: see WebSocketStream.sending_since), checking a few times per
        timeout: one task for all connections instead of a timeout scope per send."""
        timeout = self._limits.write_timeout_s
        interval = min(1.0, timeout / 4)
        while True:
            await trio.sleep(interval)
            late = trio.current_time() - timeout
            for client in list(self._clients.values()):
                if client.ws.sending_since < late and not client.closing:
                    client.end(
                        CloseReason.WRITE_TIMEOUT, f"socket accepted nothing for {timeout:g} s"
                    )

    async def _accept_loop(self, listener: _PatientListener, nursery: trio.Nursery) -> None:
        """Accept connections and start each one's guard, unless the pre-auth cap refuses it.

        A refused connection is closed here, at once, and counted as
        ``preauth_refused``: no task, no WebSocket state (see ``_PreauthTable``).
        """
        async with listener:
            while True:
                sock, addr = await listener.accept()
                self._c.accepts += 1
                remote, source = _peer(addr)
                if self._preauth.refuses(source):
                    self._c.closes["preauth_refused"] += 1
                    sock.close()
                    continue
                conn = _Conn(remote, source, trio.current_time() + self._limits.handshake_timeout_s)
                self._preauth.add(conn)
                nursery.start_soon(self._connection, trio.SocketStream(sock), conn)

    def _accept_failed(self, exc: OSError) -> None:
        c = self._c
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        c.accept_errors[name] += 1
        now = trio.current_time()
        if now - self._accept_error_logged_at >= _ACCEPT_ERROR_LOG_INTERVAL_S:
            self._accept_error_logged_at = now
            log.warning(
                "cannot accept connections: %s (%d failed accepts so far); open"
                " connections are still served, accepting again every %g s",
                exc.strerror or name,
                sum(c.accept_errors.values()),
                _ACCEPT_PAUSE_S,
            )

    def statistics(self) -> RelayStats:
        c = self._c
        return RelayStats(
            clients=sum(1 for cl in self._clients.values() if not cl.is_mesh and not cl.is_probe),
            mesh_peers=sum(1 for cl in self._clients.values() if cl.is_mesh),
            probe_clients=sum(1 for cl in self._clients.values() if cl.is_probe),
            accepts=c.accepts,
            handshakes_ok=c.handshakes_ok,
            packets_in=c.packets_in + sum(cl.packets_in for cl in self._clients.values()),
            bytes_in=c.bytes_in + sum(cl.bytes_in for cl in self._clients.values()),
            packets_out=c.packets_out + sum(cl.packets_out for cl in self._clients.values()),
            bytes_out=c.bytes_out + sum(cl.bytes_out for cl in self._clients.values()),
            messages_out=c.messages_out + sum(cl.messages_out for cl in self._clients.values()),
            drops=self._drops(),
            closes=dict(c.closes),
            queued_bytes=self._queued.used,
            queued_bytes_limit=self._queued.limit,
            skipped_frames=c.skipped_frames,
            rate_limited_s=c.rate_limited_s,
            forwarded_in=c.forwarded_in,
            flow_waited_s=c.flow_waited_s,
            flow_gave_up=c.flow_gave_up,
            accept_errors=dict(c.accept_errors),
        )

    def _drops(self) -> dict[str, int]:
        drops = {r.value: self._c.drops[r] for r in DropReason}
        for why, reason in _QUEUE_DROPS.items():
            drops[reason.value] += self._queue_drops[why]
        return drops

    def count_drop(self, reason: DropReason, n: int = 1, *, src: bytes | None = None) -> None:
        """Count packets dropped outside the server (the mesh) with the server's drops;
        with ``src``, the key of their sender, who is told if it is a client here."""
        self._c.drops[reason] += n
        if src is not None:
            sender = self._clients.get(src)
            if sender is not None:
                self._report_drop(sender, reason, n)

    def _report_drop(self, sender: _Client, why: Drop | DropReason, n: int = 1) -> None:
        """Tell ``sender`` (soon, rate-limited) that ``n`` of its packets were dropped."""
        code = _DROP_CODES.get(why)
        if code is not None:
            self._queue_report(sender, code, n)

    def _queue_report(self, sender: _Client, code: DropCode, n: int) -> None:
        """Add ``n`` to what ``sender`` is told in its next PacketsDropped (by _report_drops)."""
        if sender.is_mesh:
            return
        sender.drops_unreported[code] += n
        if sender not in self._drops_unreported:
            self._drops_unreported[sender] = None
            self._drops_to_report.set()

    def _on_queue_drop(self, frames: bytes, why: Drop, count: int) -> None:
        """A data queue dropped ``count`` frames: their sender (the source of the
        RecvPackets, the same for every packet of a run) is told, through its own relay
        if it is a client of another one (PacketsDroppedFor)."""
        if frames[0] != _RECV:
            return
        src = frames[5 : 5 + _K]
        sender = self._clients.get(src)
        if sender is not None:
            self._report_drop(sender, why, count)
            return
        code = _DROP_CODES.get(why)
        if code is None or self._forwarder is None:
            return
        remote = self._remote_drops
        if src not in remote:
            if len(remote) >= _MAX_SENDERS_TRACKED:
                return
            remote[src] = Counter()
        remote[src][code] += count
        self._drops_to_report.set()

    def _report_remote_drops(self) -> None:
        """Pass drops of other relays' clients' packets to the forwarder; what it cannot
        pass yet (a link still opening) waits for the next interval."""
        remote, self._remote_drops = self._remote_drops, {}
        forwarder = self._forwarder
        if forwarder is None:
            return
        for src, codes in remote.items():
            for code, n in codes.items():
                try:
                    if not forwarder.report_drops(src, code, min(n, 2**32 - 1)):
                        self._remote_drops.setdefault(src, Counter())[code] += n
                        self._drops_to_report.set()
                except Exception as exc:
                    self._forward_failed(exc, 0)

    def _told_of_drops(self, src: bytes, code: DropCode, count: int) -> None:
        """A mesh peer dropped ``count`` packets of our client ``src``: it is told."""
        sender = self._clients.get(src)
        if sender is not None:
            self._queue_report(sender, code, count)

    async def _report_drops(self) -> None:
        """Send PacketsDropped to the senders that lost packets, one report per interval."""
        interval = self._limits.drop_report_interval_s
        while True:
            await self._drops_to_report.wait()
            self._drops_to_report = trio.Event()
            senders, self._drops_unreported = self._drops_unreported, {}
            for sender in senders:
                for code, n in sender.drops_unreported.items():
                    frame = wire.PacketsDropped(reason=code, count=min(n, 2**32 - 1))
                    self._enqueue_ctrl(sender, wire.encode(frame))
                sender.drops_unreported.clear()
            self._report_remote_drops()
            await trio.sleep(interval)

    def watch_presence(self) -> PresenceQueue:
        """The queue where this server reports its clients' (not mesh peers') presence.

        Changes are reported from the first call on (call it before serve());
        the same queue is returned to every caller. Its consumer owns applying them.
        """
        if self._presence is None:
            self._presence = PresenceQueue()
        return self._presence

    def add_forwarder(self, forwarder: PacketForwarder) -> None:
        """Hand packets for keys not connected here to ``forwarder`` (one at a time).

        Its ``forward_frames`` runs synchronously in the sending client's reader; an
        exception from it drops those packets (``forward_error``) and nothing else.
        """
        if self._forwarder is not None and self._forwarder is not forwarder:
            raise RuntimeError("another packet forwarder is registered")
        self._forwarder = forwarder

    def remove_forwarder(self, forwarder: PacketForwarder) -> None:
        """Stop using ``forwarder``; a no-op if another one replaced it meanwhile."""
        if self._forwarder is forwarder:
            self._forwarder = None

    def client_statistics(self) -> list[ClientStats]:
        return [cl.stats() for cl in self._clients.values()]

    def is_connected(self, key: NodeKey) -> bool:
        return key.raw in self._clients

    def client_hello(self, key: NodeKey) -> ClientHello | None:
        """What a client connected here said in its handshake (disco key, endpoints)."""
        client = self._clients.get(key.raw)
        return client.hello if client is not None and not client.is_mesh else None

    def broadcast_health(self, problem: str) -> None:
        """Tell every client about a problem (empty string: healthy again)."""
        frame = wire.encode(wire.Health(problem=problem))
        for cl in list(self._clients.values()):
            self._enqueue_ctrl(cl, frame)

    async def drain(
        self,
        *,
        reconnect_in_ms: int = 0,
        try_for_ms: int = 10_000,
        grace_s: float = 2.0,
        close_s: float = 1.0,
    ) -> None:
        """Shut the data plane down in order, for a planned restart.

        Tell every client we are restarting and give them up to ``grace_s`` to
        leave on their own (a client that knows other relays moves at once; until
        it has, this relay still delivers to it). Then, for up to ``close_s``, let
        the writers of those still here flush what is queued, close each with
        1001 (going away) and wait for the close frames to go out.
        """
        self.draining = True
        frame = wire.encode(wire.Restarting(reconnect_in_ms=reconnect_in_ms, try_for_ms=try_for_ms))
        clients = [cl for cl in self._clients.values() if not cl.is_mesh]
        for cl in clients:
            self._enqueue_ctrl(cl, frame)
        # Polled: this runs once per shutdown, over every client.
        with trio.move_on_after(grace_s):
            while any(not cl.closing for cl in clients):  # noqa: ASYNC110
                await trio.sleep(0.01)
        remaining = list(self._clients.values())
        with trio.move_on_after(close_s):
            while any(cl.out for cl in remaining if not cl.closing):  # noqa: ASYNC110
                await trio.sleep(0.01)
            for cl in remaining:
                cl.end(CloseReason.GOING_AWAY, "relay restarting")
            for cl in remaining:
                await cl.closed.wait()
        for cl in remaining:
            cl.end(CloseReason.GOING_AWAY, "relay restarting")

    # ---- connection lifecycle --------------------------------------------

    async def _connection(self, stream: trio.SocketStream, conn: _Conn) -> None:
        """The error boundary around one TCP connection's whole life.

        Everything the connection runs (TLS, upgrade, handshake, then the nursery of
        its reader and writer) runs inside this guard. Whatever escapes it is logged
        once with the peer's address, counted in ``closes`` by reason, and ends this
        connection only: the server's own cancellation (and KeyboardInterrupt) pass
        through untouched. Every accepted connection is counted exactly once.
        """
        try:
            await self._serve_connection(stream, conn)
        except BaseException as exc:
            self._contain(conn, exc)
        finally:
            self._preauth.remove(conn)
            # Only cancellation from outside (the server stopping) leaves it uncounted.
            self._count_close(conn, "server_stopped")
            await trio.aclose_forcefully(stream)

    def _contain(self, conn: _Conn, exc: BaseException) -> None:
        """Count and log what escaped a connection; re-raise only what is not ours to stop."""
        errors: BaseException | None
        others: BaseException | None
        if isinstance(exc, BaseExceptionGroup):
            errors, others = exc.split(Exception)
        elif isinstance(exc, Exception):
            errors, others = exc, None
        else:
            errors, others = None, exc
        if errors is not None:
            if _peer_went_away(errors):
                self._count_close(conn, _GONE[conn.stage])
                log.debug("connection from %s: peer went away during %s", conn.remote, conn.stage)
            else:
                self._count_close(conn, "internal_error")
                log.error(
                    "connection from %s failed during %s; closed it",
                    conn.remote,
                    conn.stage,
                    exc_info=errors,
                )
        if others is not None:
            raise others

    def _count_close(self, conn: _Conn, label: str) -> None:
        if conn.closed_as is None:
            conn.closed_as = label
            self._c.closes[label] += 1

    async def _tls_handshake(
        self, tcp: trio.SocketStream, conn: _Conn
    ) -> trio.SSLStream[Any] | None:
        """Wrap ``tcp`` in TLS with the certificate current now; None if the handshake fails.

        Runs inside the pre-auth deadline, and under its own bound. A failure
        (plain HTTP or garbage on the TLS port, an unknown CA on the client's
        side, a reset) is counted as ``tls_handshake_failed``, a timeout as
        ``tls_handshake_timeout``, and ends this connection only.
        """
        assert self.tls is not None
        conn.stage = "tls"
        stream = trio.SSLStream(tcp, self.tls.context, server_side=True, https_compatible=True)
        with trio.move_on_after(self.cfg.tls.handshake_timeout_s) as bound:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                self._count_close(conn, "tls_handshake_failed")
                log.debug(
                    "connection from %s: %s",
                    conn.remote,
                    describe_tls_error(exc) or "TLS handshake failed: connection closed",
                )
                return None
        if bound.cancelled_caught:
            self._count_close(conn, "tls_handshake_timeout")
            return None
        conn.stage = "upgrade"
        return stream

    async def _serve_connection(self, tcp: trio.SocketStream, conn: _Conn) -> None:
        lim = self._limits
        decoder = wire.FrameDecoder(max_body=wire.MAX_HANDSHAKE_BODY)
        hello: ClientHello | None = None
        server_info = b""
        failure: _Closing | None = None
        ws: WebSocketStream | None = None
        with conn.scope:
            if conn.shed:
                # Shed before its task first ran: nothing was set up for it.
                self._count_close(conn, "preauth_shed")
                return
            stream: trio.abc.Stream = tcp
            if self.tls is not None:
                tls_stream = await self._tls_handshake(tcp, conn)
                if tls_stream is None:
                    return
                stream = tls_stream
            early = await self._upgrade(stream, conn)
            if early is None:
                return
            # Until the handshake is done a message can only carry a ClientInfo: a small
            # limit keeps what an unauthenticated connection can make us hold small.
            ws = WebSocketStream(
                stream,
                server_side=True,
                max_message=wire.MAX_PREAUTH_MESSAGE_BYTES,
                receive_bytes=lim.receive_buffer_bytes,
                leftover=early,
            )
            conn.stage = "handshake"
            try:
                hello, server_info = await self._handshake(ws, decoder, conn)
            except _Closing as exc:
                failure = exc
            except ProtocolError as exc:
                failure = _Closing(exc.reason, str(exc))
            except WebSocketClosed:
                # Its Close is answered (echoed) like any other peer's.
                failure = _Closing(CloseReason.CLOSED_BY_PEER, "", label="closed_in_handshake")
        self._preauth.remove(conn)
        if conn.scope.cancelled_caught:
            if conn.shed:
                self._count_close(conn, "preauth_shed")
            elif conn.over_budget:
                assert ws is not None
                detail = f"no ClientInfo in the first {wire.MAX_PREAUTH_MESSAGE_BYTES} bytes"
                await self._close(conn, ws, CloseReason.BAD_HANDSHAKE, detail)
            elif conn.stage == "handshake":
                assert ws is not None
                await self._close(conn, ws, CloseReason.HANDSHAKE_TIMEOUT, "no ClientInfo in time")
            elif conn.stage == "tls":
                self._count_close(conn, "tls_handshake_timeout")
            else:
                self._count_close(conn, "upgrade_timeout")
            return
        assert ws is not None
        if failure is not None:
            await self._close(conn, ws, failure.reason, failure.detail, label=failure.label)
            return
        assert hello is not None
        conn.stage = "open"
        await self._run_client(ws, hello, server_info, decoder, conn)

    async def _upgrade(self, stream: trio.abc.Stream, conn: _Conn) -> bytes | None:
        """Read the HTTP upgrade request (wsproto's handshake) and answer it. None if the
        WebSocket is not open; else what the client sent after its request.

        A request for another path is answered 404, one without the ``derp``
        subprotocol 400, bytes that are not an upgrade request 400 (wsproto's
        answer); each is counted, as is a peer that goes away first. The request's
        size is bounded by h11 (16 KiB), its time by the pre-auth deadline.
        """
        handshake = H11Handshake(ConnectionType.SERVER)
        try:
            request = await read_upgrade_request(
                stream, handshake, self._limits.receive_buffer_bytes
            )
        except HandshakeFailed as exc:
            self._count_close(conn, "closed_before_upgrade" if exc.status is None else "bad_http")
            return None
        if request.target.split("?", 1)[0] != "/derp":
            self._count_close(conn, "bad_path")
            await reject_upgrade(
                stream, handshake, 404, b"not found: the relay endpoint is /derp\n"
            )
            return None
        if wire.SUBPROTOCOL not in request.subprotocols:
            self._count_close(conn, "bad_subprotocol")
            await reject_upgrade(
                stream, handshake, 400, b"the WebSocket subprotocol must be 'derp'\n"
            )
            return None
        return await accept_upgrade(stream, handshake, wire.SUBPROTOCOL)

    async def _run_client(
        self,
        ws: WebSocketStream,
        hello: ClientHello,
        server_info: bytes,
        decoder: wire.FrameDecoder,
        conn: _Conn,
    ) -> None:
        """Serve an authenticated client: registered first, then told (ServerInfo, the
        first frame its writer sends), so that a client that has read its ServerInfo is
        reachable here, and its peers' packets to it are not refused as unknown."""
        self._c.handshakes_ok += 1
        is_mesh = hello.mesh_proof is not None and not hello.probe
        lim = self._limits
        out = Outbox(
            FrameQueue(
                lim.send_queue_packets,
                lim.send_queue_bytes,
                budget=self._queued,
                drops=self._queue_drops,
            ),
            FrameQueue(lim.control_queue_frames, lim.max_message_bytes),
        )
        out.set_flow(lim.flow_high_water, lim.flow_low_water)
        out.data.on_drop = self._on_queue_drop
        client = _Client(ws, hello, conn.remote, is_mesh=is_mesh, out=out)
        # A client may not send ForwardPacket, so its largest legal frame is a
        # SendPacket: anything longer is refused at its header.
        decoder.max_body = wire.MAX_FRAME_BODY if is_mesh else wire.MAX_CLIENT_FRAME_BODY
        self._register(client)
        out.control.append_unchecked(server_info)
        try:
            async with trio.open_nursery() as nursery:
                # From here the nursery's scope is the one end() cancels: a scope (and its
                # cancel status) less to hold for every open connection.
                if client.cancel_scope.cancel_called:
                    nursery.cancel_scope.cancel()
                client.cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._run_reader, client, decoder, nursery.cancel_scope)
                nursery.start_soon(self._run_writer, client, nursery.cancel_scope)
        finally:
            self._unregister(client)
        reason = client.close_reason or CloseReason.CLOSED_BY_PEER
        try:
            await self._close(conn, ws, reason, client.close_detail)
        finally:
            client.closed.set()

    async def _handshake(
        self, ws: WebSocketStream, decoder: wire.FrameDecoder, conn: _Conn
    ) -> tuple[ClientHello, bytes]:
        """ServerKey out, ClientInfo in: the client's hello, and the ServerInfo to send it
        once it is registered (see _run_client)."""
        challenge = new_challenge()
        await ws.send(
            wire.encode(wire.ServerKey(public_key=self.key.public.raw, challenge=challenge))
        )
        # Until its ClientInfo a connection has proved nothing: it may send at most this
        # much (a ClientInfo is at most 4,101 bytes), so skipping frames of unknown type
        # costs at most this much work per connection. Past it, nothing more is read
        # (TCP pushes back) until the deadline closes it: closing at once would only
        # invite a flood of reconnects, each costing more than a read.
        budget = wire.MAX_PREAUTH_MESSAGE_BYTES
        received = 0
        while True:
            msg = await ws.receive()
            received += len(msg)
            decoder.receive_data(msg)
            event = decoder.next_event()
            if event is wire.NEED_DATA:
                # A WebSocket frame that carries nothing (a Ping, an empty frame) costs
                # work too: each counts as _NOOP_FRAME_BYTES.
                if received + ws.noop_frames * _NOOP_FRAME_BYTES > budget:
                    conn.over_budget = True
                    await trio.sleep_forever()
                continue
            if not isinstance(event, wire.ClientInfo):
                raise RemoteProtocolError(
                    f"expected ClientInfo, got {type(event).__name__}", CloseReason.BAD_HANDSHAKE
                )
            hello = open_client_info(self.key, challenge, event)
            self._admit(hello, challenge)
            lim = self._limits
            info: dict[str, Any] = {
                "rate_bytes_per_s": lim.rate_bytes_per_s,
                "rate_burst_bytes": self._burst(),
                "keepalive_s": lim.keepalive_interval_s,
                "max_packet_bytes": wire.MAX_PACKET_BYTES,
                # This relay takes ForwardPackets (runs of packets) from mesh peers.
                "forward_batch": True,
                # ... and ForwardRun (runs as RecvPacket frames).
                "forward_runs": True,
                # ... and PacketsDroppedFor: it tells its clients of drops at other relays.
                "drop_reports": True,
            }
            if self.http_url is not None:
                info["http_url"] = self.http_url
            # Raised before ServerInfo leaves: a client may send full-size messages as soon
            # as it has read it, and the pre-auth bound holds only until then (PROTOCOL.md).
            ws.max_message = lim.max_receive_message_bytes
            return hello, wire.encode(seal_server_info(self.key, hello.client_key, info))

    def _admit(self, hello: ClientHello, challenge: bytes) -> None:
        if hello.mesh_proof is not None:
            # Mesh peers and probe clients are judged by the mesh key alone, never by
            # client policy.
            secret = self.probe_key if hello.probe else self._mesh_key
            if secret is None:
                raise _Closing(CloseReason.UNAUTHORIZED, "this relay is not part of a mesh")
            want = mesh_proof(secret, challenge, hello.client_key)
            if not hmac.compare_digest(want, hello.mesh_proof):
                # Counted as bad_mesh_key (not unauthorized): a relay of our own mesh
                # with the wrong key is an operator's problem, not a client's.
                raise _Closing(
                    CloseReason.UNAUTHORIZED, "mesh key proof does not match", label="bad_mesh_key"
                )
            return
        if self.cfg.admission.policy == "token" and (
            hello.token is None or hello.token not in self._tokens
        ):
            raise _Closing(CloseReason.UNAUTHORIZED, "admission token missing or not accepted")

    def _burst(self) -> int:
        lim = self._limits
        return lim.rate_burst_bytes or lim.rate_bytes_per_s

    def _register(self, client: _Client) -> None:
        old = self._clients.get(client.key)
        if old is not None:
            old.end(CloseReason.REPLACED, "a newer connection with the same key took over")
            log.info(
                "client %s replaced (%s → %s)", client.node_key.short(), old.remote, client.remote
            )
        self._clients[client.key] = client
        if not client.is_mesh and self._presence is not None:
            self._presence.put_nowait(Presence(key=client.node_key, hello=client.hello))

    def _unregister(self, client: _Client) -> None:
        client.closing = True
        c = self._c
        c.packets_in += client.packets_in
        c.bytes_in += client.bytes_in
        c.packets_out += client.packets_out
        c.bytes_out += client.bytes_out
        c.messages_out += client.messages_out
        client.packets_in = client.bytes_in = client.packets_out = 0
        client.bytes_out = client.messages_out = 0
        c.drops[DropReason.DISCONNECTED] += client.out.data.clear()
        client.out.control.clear()
        # Readers waiting for its queue to drain stop waiting.
        client.out.release()
        self._drops_unreported.pop(client, None)
        if self._clients.get(client.key) is not client:
            return  # replaced: the newer connection owns the key now
        del self._clients[client.key]
        gone = wire.encode(wire.PeerGone(peer=client.key, reason=wire.PeerGoneReason.DISCONNECTED))
        for sender in client.senders:
            other = self._clients.get(sender)
            if other is not None:
                self._enqueue_ctrl(other, gone)
        if not client.is_mesh and self._presence is not None:
            self._presence.put_nowait(Presence(key=client.node_key, hello=None))

    async def _close(
        self,
        conn: _Conn,
        ws: WebSocketStream,
        reason: CloseReason,
        detail: str,
        *,
        label: str | None = None,
    ) -> None:
        self._count_close(conn, label or reason.label)
        if reason not in (CloseReason.NORMAL, CloseReason.CLOSED_BY_PEER, CloseReason.GOING_AWAY):
            log.info("closing connection from %s: %s: %s", conn.remote, reason.label, detail)
        text = f"{reason.label}: {detail}" if detail else reason.label
        with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
            scope.shield = True
            # A close reason is cut to RFC 6455's 123 bytes there.
            await ws.aclose(reason if reason != CloseReason.CLOSED_BY_PEER else 1000, text)

    # ---- the two tasks of a connection -----------------------------------

    async def _run_reader(
        self, client: _Client, decoder: wire.FrameDecoder, scope: trio.CancelScope
    ) -> None:
        try:
            await self._read_loop(client, decoder)
        except _PEER_GONE:
            client.end(CloseReason.CLOSED_BY_PEER, "")
        except ProtocolError as exc:
            client.end(exc.reason, str(exc))
        except _Closing as exc:
            client.end(exc.reason, exc.detail)
        finally:
            scope.cancel()

    async def _read_loop(self, client: _Client, decoder: wire.FrameDecoder) -> None:
        lim = self._limits
        bucket = (
            TokenBucket(lim.rate_bytes_per_s, self._burst(), trio.current_time())
            if lim.rate_bytes_per_s
            else None
        )
        frame_cost = lim.rate_frame_min_bytes
        # Frames that deliver nothing (KeepAlive, Ping, unknown types, packets for keys
        # not here) cost work all the same: a client may send only so many. Relays of
        # our own mesh are trusted not to flood.
        noop_bucket = (
            TokenBucket(lim.noop_frames_per_s, lim.noop_frames_per_s, trio.current_time())
            if lim.noop_frames_per_s and not client.is_mesh
            else None
        )
        turn_frames = lim.frames_per_turn
        turn_bytes = lim.max_message_bytes
        ws = client.ws
        receive = ws.receive
        # WebSocket frames that carried nothing (Pings, empty frames), already charged.
        ws_noop = ws.noop_frames
        clients = self._clients
        drops = self._c.drops
        src_key = client.key
        flow_wait = lim.flow_wait_s
        while True:
            decoder.receive_data(await receive())
            if noop_bucket is not None and ws.noop_frames != ws_noop:
                # WebSocket frames that deliver nothing count like the protocol's own.
                pause = noop_bucket.take(ws.noop_frames - ws_noop, trio.current_time())
                ws_noop = ws.noop_frames
                if pause:
                    self._c.rate_limited_s += pause
                    await trio.sleep(pause)
            # A message (up to 1 MiB: 200,000 five-byte frames) is taken in turns of at
            # most turn_frames frames or turn_bytes bytes, with a yield to the other
            # connections between two turns: one connection's work cannot hold the
            # others up for more than a turn (docs/architecture.md, Fairness).
            first = True
            while True:
                before = decoder.buffered
                # Consecutive packets to one destination come as one run, already turned
                # into the RecvPackets from this client (wire.FrameDecoder.relay_split).
                runs = decoder.relay_split(src_key, turn_frames, turn_bytes)
                if not runs:
                    break
                pause = 0.0
                if bucket is not None:
                    # A frame costs work whatever its size: tiny ones count as frame_cost.
                    frames = sum(run[1] for run in runs)
                    cost = max(before - decoder.buffered, frames * frame_cost)
                    pause = bucket.take(cost, trio.current_time())
                if pause:
                    self._c.rate_limited_s += pause
                    await trio.sleep(pause)
                elif not first:
                    await trio.lowlevel.checkpoint()
                first = False
                noop = 0
                # The routing hot path, written out: one pass over every run of the turn,
                # each looked up, counted and queued as one unit (one queue entry). The
                # destination is looked up once per change of destination (per turn: a
                # destination may leave while we yield).
                routed = routed_bytes = 0
                last_key = None
                dest: _Client | None = None
                forwarder = self._forwarder
                # The queues this turn fed, for flow control (once per destination).
                gates: list[Outbox] = []
                gate: Outbox | None = None
                # Consecutive packets for a key on another relay, forwarded as one run.
                pending: list[bytes] = []
                pending_count = 0
                for ftype, count, data, dest_key in runs:
                    if ftype != _SEND:
                        if ftype in (_FWDR, _FWDS, _FWD) and client.is_mesh:
                            if ftype == _FWDR:
                                fed = self._deliver_forwarded_frames(data)
                            elif ftype == _FWDS:
                                fed = self._deliver_forwarded_run(data)
                            else:
                                fed = self._deliver_forwarded(data)
                            if fed is not gate and fed is not None:
                                gate = fed
                                gates.append(fed)
                        else:
                            self._control(client, ftype, data)
                            noop += 1
                        continue
                    if dest_key != last_key:
                        if pending:
                            assert forwarder is not None and last_key is not None
                            noop += self._forward_run(
                                client, forwarder, last_key, pending, pending_count, gates
                            )
                            pending = []
                            pending_count = 0
                        last_key = dest_key
                        dest = clients.get(dest_key)
                        if dest is not None:
                            if len(dest.senders) < _MAX_SENDERS_TRACKED:
                                dest.senders.add(src_key)
                            gates.append(dest.out)
                    routed += count
                    routed_bytes += len(data) - count * _PACKET_OVERHEAD
                    if dest is None:
                        if forwarder is not None:
                            pending.append(data)
                            pending_count += count
                            continue
                        drops[DropReason.UNKNOWN_DEST] += count
                        self._note_gone(client, dest_key)
                        noop += count
                        continue
                    if dest.closing:
                        drops[DropReason.DEST_CLOSING] += count
                        self._report_drop(client, DropReason.DEST_CLOSING, count)
                        continue
                    # The whole run is one entry of dest's queue (drop-oldest bounds, in
                    # packets, in FrameQueue.push).
                    out = dest.out
                    if out.data.push(data, count):
                        out.poke()
                if pending:
                    assert forwarder is not None and last_key is not None
                    noop += self._forward_run(
                        client, forwarder, last_key, pending, pending_count, gates
                    )
                client.packets_in += routed
                client.bytes_in += routed_bytes
                if noop and noop_bucket is not None:
                    pause = noop_bucket.take(noop, trio.current_time())
                    if pause:
                        self._c.rate_limited_s += pause
                        await trio.sleep(pause)
                if flow_wait:
                    for fed in gates:
                        await self._hold_for(fed, flow_wait, shared=client.is_mesh)
            if decoder.error is not None:
                raise decoder.error
            if decoder.skipped_frames:
                self._c.skipped_frames += decoder.skipped_frames
                decoder.skipped_frames = 0

    async def _hold_for(self, gate: Outbox, wait_s: float, *, shared: bool) -> None:
        """Flow control: while ``gate`` is over its high mark, read nothing more (TCP
        slows the sender) until its writer took it down to the low mark; give up on it
        once a whole wait of ``wait_s`` passed with its writer taking nothing. A
        ``shared`` reader (a mesh link's, carrying many senders' packets) gives up
        after one whole wait without the queue draining, until it drains: a receiver
        that reads slowly but steadily slows its own senders, never the link."""
        while gate.pressed() and not gate.stuck() and not (shared and gate.skipped_by_shared()):
            began = trio.current_time()
            drained = await gate.wait_drained(wait_s, shared=shared)
            self._c.flow_waited_s += trio.current_time() - began
            if drained:
                return
            if gate.stuck() or shared:
                self._c.flow_gave_up += 1

    def _forward_run(
        self,
        client: _Client,
        forwarder: PacketForwarder,
        dest_key: bytes,
        runs: list[bytes],
        count: int,
        gates: list[Outbox],
    ) -> int:
        """Hand consecutive packets for a key not here (``runs`` of RecvPacket frames,
        ``count`` packets) to the forwarder; note the queue they went to in ``gates``.
        How many delivered nothing (no relay holds the key)."""
        frames = runs[0] if len(runs) == 1 else b"".join(runs)
        try:
            if forwarder.forward_frames(client.key, dest_key, frames, count):
                fed = forwarder.gate(dest_key)
                if fed is not None:
                    gates.append(fed)
                return 0
        except Exception as exc:
            self._forward_failed(exc, count)
            return 0
        self._c.drops[DropReason.UNKNOWN_DEST] += count
        self._note_gone(client, dest_key)
        return count

    def _forward_failed(self, exc: Exception, n: int = 1) -> None:
        """The forwarder raised: the packets are dropped; the connection and the node go on."""
        self._c.drops[DropReason.FORWARD_ERROR] += n
        now = trio.current_time()
        if now - self._forward_error_logged_at >= _FORWARD_ERROR_LOG_INTERVAL_S:
            self._forward_error_logged_at = now
            log.error(
                "packet forwarder failed (%d packets dropped so far): %r",
                self._c.drops[DropReason.FORWARD_ERROR],
                exc,
                exc_info=exc,
            )

    def _deliver_forwarded(self, body: bytes) -> Outbox | None:
        """A packet another relay forwarded to a client of ours. Never forwarded again.

        Returns the queue it went to (for flow control), None if it was dropped.
        """
        n = len(body)
        if n < 2 * _K or n > 2 * _K + wire.MAX_PACKET_BYTES:
            raise wire.bad_send_packet(n - _K)
        dest = self._forwarded_to(body, 1)
        if dest is None:
            return None
        if dest.out.data.push(_HDR.pack(_RECV, n - _K) + body[:_K] + body[2 * _K :]):
            dest.out.poke()
        return dest.out

    def _deliver_forwarded_frames(self, body: bytes) -> Outbox | None:
        """A ForwardRun: the RecvPacket frames of a run from one source to a client of
        ours, checked and queued as they came, as one entry.

        Returns the queue they went to (for flow control), None if they were dropped.
        """
        count = wire.count_run(body)
        dest = self._forwarded_to(body, count)
        if dest is None:
            return None
        dest.out.data.push(body[2 * _K :], count)
        dest.out.poke()
        return dest.out

    def _deliver_forwarded_run(self, body: bytes) -> Outbox | None:
        """A ForwardPackets: a run of packets from one source to a client of ours,
        queued as one entry (as many as a message holds, so no entry outgrows one).

        Returns the queue they went to (for flow control), None if they were dropped.
        """
        payloads = wire.split_packets(body)
        dest = self._forwarded_to(body, len(payloads))
        if dest is None:
            return None
        src = body[:_K]
        pack = _HDR.pack
        push = dest.out.data.push
        room = self._limits.max_message_bytes
        parts: list[bytes] = []
        size = 0
        for payload in payloads:
            n = _PACKET_OVERHEAD + len(payload)
            if size + n > room and parts:
                push(b"".join(parts), len(parts) // 3)
                parts = []
                size = 0
            parts += (pack(_RECV, _K + len(payload)), src, payload)
            size += n
        push(b"".join(parts), len(parts) // 3)
        dest.out.poke()
        return dest.out

    def _forwarded_to(self, body: bytes, count: int) -> _Client | None:
        """The local client that ``count`` packets forwarded by another relay are for (the
        body starts with source and destination keys); None, counted, if they are dropped."""
        self._c.forwarded_in += count
        dest = self._clients.get(body[_K : 2 * _K])
        if dest is None or dest.is_mesh:
            self._c.drops[DropReason.MESH_NOT_HERE] += count
            return None
        if dest.closing:
            self._c.drops[DropReason.DEST_CLOSING] += count
            return None
        return dest

    def _note_gone(self, src: _Client, dest_key: bytes) -> None:
        now = trio.current_time()
        last = src.gone_notified.get(dest_key)
        if last is not None and now - last < self._limits.peer_gone_interval_s:
            return
        if len(src.gone_notified) > _MAX_SENDERS_TRACKED:
            src.gone_notified.clear()
        src.gone_notified[dest_key] = now
        self._enqueue_ctrl(
            src, wire.encode(wire.PeerGone(peer=dest_key, reason=wire.PeerGoneReason.NOT_HERE))
        )

    def _control(self, client: _Client, ftype: int, body: bytes) -> None:
        event = wire.decode_body(ftype, body)
        match event:
            case None:
                self._c.skipped_frames += 1
            case wire.Ping(data=data):
                self._enqueue_ctrl(client, _PONG_HEADER + data)
            case wire.KeepAlive() | wire.Pong():
                pass
            case wire.NotePreferred(preferred=preferred):
                client.preferred = preferred
            case wire.PacketsDroppedFor(src=src, reason=code, count=count) if client.is_mesh:
                self._told_of_drops(src, code, count)
            case _:
                raise RemoteProtocolError(
                    f"{type(event).__name__} is not a frame a client may send",
                    CloseReason.UNEXPECTED_FRAME,
                )

    def _enqueue_ctrl(self, client: _Client, frame: bytes) -> None:
        if client.closing:
            return
        if not client.out.control.offer(frame):
            self._c.drops[DropReason.CONTROL_QUEUE_FULL] += 1
            return
        client.out.poke()

    async def _run_writer(self, client: _Client, scope: trio.CancelScope) -> None:
        try:
            await self._write_loop(client)
        except _PEER_GONE:
            client.end(CloseReason.CLOSED_BY_PEER, "")
        finally:
            scope.cancel()

    async def _write_loop(self, client: _Client) -> None:
        lim = self._limits
        max_bytes = lim.max_message_bytes
        keepalive = wire.encode(wire.KeepAlive())
        send = client.ws.send
        out = client.out
        while True:
            if not await out.wait(lim.keepalive_interval_s):
                out.control.append_unchecked(keepalive)
            message, packets = out.next_message(max_bytes)
            # No timeout scope per send: the write watchdog (_watch_writes) ends a
            # client whose send takes longer than write_timeout_s.
            await send(message)
            client.packets_out += packets
            client.bytes_out += len(message)
            client.messages_out += 1


async def serve_relay(
    cfg: RelayConfig,
    key: PrivateKey,
    *,
    tokens: frozenset[str] = frozenset(),
    mesh_key: bytes | None = None,
    task_status: trio.TaskStatus[RelayServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a relay's WebSocket server until cancelled; started() with the server."""
    server = RelayServer(cfg, key, tokens=tokens, mesh_key=mesh_key)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, cfg.relay.listen_host, cfg.relay.port)
        task_status.started(server)
