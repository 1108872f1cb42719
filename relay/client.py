"""RelayClient: the client side of the relay protocol.

``open_relay_client(url, key)`` connects, proves the key, and yields a client
with ``send(dest, payload)`` and ``receive()``. Behind it one supervisor task
keeps a connection up: when the relay goes away (closed, restarting, silent
past two keepalives) it reconnects with jittered exponential backoff, trying
the given URLs in turn. Packets queued while disconnected wait (bounded;
``send`` blocks when the queue is full) and go out after the reconnect.

Like the relay, the client has one writer task per connection that sends
everything queued as one WebSocket message, control frames first.

Any number of tasks may call ``send``, ``receive``, ``ping``, ``wait_sent``
and ``wait_connected`` at once. Waiters park in trio ``ParkingLot``s (or a
memory channel, or an Event of their own) and are woken by whoever changes
what they wait for: the writer wakes every blocked sender once it freed room
(the send queue is bounded in packets and in bytes, relay/queue.py), and
every ``wait_sent`` caller after each message. When the client
stops (its ``run`` ends: cancelled, or replaced by a newer connection with
the same key) every waiter, and every later call, raises
:class:`RelayClosedError` instead of waiting for ever. A client runs once.
"""

from __future__ import annotations

import logging
import os
import ssl
import struct
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import nacl.utils
import trio

from relay.protocol import wire
from relay.protocol.backoff import Backoff
from relay.protocol.handshake import open_server_info, seal_client_info
from relay.protocol.keys import NodeKey, PrivateKey
from relay.protocol.wire import CloseReason, FrameType, ProtocolError, RemoteProtocolError

from .queue import FrameQueue, Outbox
from .tls import describe_tls_error
from .wsstream import HandshakeFailed, WebSocketClosed, WebSocketStream, connect_websocket

__all__ = [
    "ClientStatistics",
    "ConnectError",
    "Packet",
    "RelayClient",
    "RelayClosedError",
    "client_handshake",
    "open_relay_client",
]

log = logging.getLogger(__name__)

_HDR = wire.FRAME_HEADER
_LEN = struct.Struct(">I")
_K = wire.KEY_BYTES
_PONG_HEADER = wire.frame_header(FrameType.PONG, wire.PING_BYTES)
#: Pongs (answers to the relay's Pings) queued at most; beyond, a Ping goes unanswered.
_CONTROL_QUEUE_FRAMES = 64


class ConnectError(Exception):
    """The first connection to a relay failed (unreachable, refused, bad handshake)."""


@dataclass(frozen=True, slots=True)
class Packet:
    src: NodeKey
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientStatistics:
    connected: bool
    url: str | None
    connects: int
    packets_sent: int
    packets_received: int
    send_queued: int
    send_queued_bytes: int
    lost_in_flight: int
    last_close: str | None
    #: Packets of ours the relay reported it dropped (PacketsDropped frames), all reasons.
    dropped_by_relay: int


class RelayClosedError(Exception):
    """The client stopped for good: closed, or replaced by a newer connection with the same key."""


@dataclass(slots=True)
class _PingWait:
    """One ``ping()`` call: set when its Pong came back or its connection ended."""

    done: trio.Event = field(default_factory=trio.Event)
    answered: bool = False


class _Disconnect(Exception):
    def __init__(self, why: str, code: int | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.code = code


class RelayClient:
    def __init__(
        self,
        urls: Sequence[str],
        key: PrivateKey,
        *,
        token: str | None = None,
        mesh_key: bytes | None = None,
        probe: bool = False,
        server_key: NodeKey | None = None,
        preferred: bool = False,
        send_queue_packets: int = 1024,
        send_queue_bytes: int = 4 * 1024 * 1024,
        receive_queue_packets: int = 1024,
        max_message_bytes: int = 64 * 1024,
        connect_timeout_s: float = 5.0,
        write_timeout_s: float = 15.0,
        disco_key: NodeKey | None = None,
        endpoints: Sequence[str] = (),
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        flow_marks: tuple[float, float] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("at least one relay URL is needed")
        self.urls = list(urls)
        self.key = key
        self._token = token
        self._mesh_key = mesh_key
        # With mesh_key: a probe client of the mesh's own health monitor, not a relay.
        self._probe = probe
        self._pinned_server_key = server_key
        self.disco_key = disco_key
        self.endpoints: tuple[str, ...] = tuple(endpoints)
        self._preferred = preferred
        self._max_message = max_message_bytes
        self._connect_timeout = connect_timeout_s
        #: A relay whose socket takes nothing of a send for this long is given up on.
        self._write_timeout = write_timeout_s
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        #: What wss:// relays are verified with (None: the system's trust store).
        self._ssl_context = ssl_context
        # Written by send()/ping() (any task); drained by the connection's writer.
        self._out = Outbox(
            FrameQueue(send_queue_packets, send_queue_bytes),
            FrameQueue(_CONTROL_QUEUE_FRAMES, max_message_bytes),
        )
        if flow_marks is not None:
            # A mesh link: the relay's readers wait on this queue (Outbox.pressed).
            self._out.set_flow(*flow_marks)
        # Senders waiting for room in the data queue; wait_sent() callers waiting for the writer.
        self._space = trio.lowlevel.ParkingLot()
        self._progress = trio.lowlevel.ParkingLot()
        self._recv_send, self._recv_receive = trio.open_memory_channel[Packet](
            receive_queue_packets
        )
        self._pings: dict[bytes, _PingWait] = {}
        # Written by the supervisor.
        self.server_key: NodeKey | None = None
        self.server_info: dict[str, Any] = {}
        self.url: str | None = None
        self.connected = False
        self._connected_event = trio.Event()
        self._connects = 0
        self._last_close: str | None = None
        self._restart_hint_s: float | None = None
        self.closed_reason: str | None = None
        self._session_scope: trio.CancelScope | None = None
        self._move_requested = False
        # Written by the reader.
        self.health = ""
        self.peer_gone: dict[NodeKey, wire.PeerGoneReason] = {}
        #: Packets of ours the relay reported dropped (PacketsDropped), by reason.
        self.dropped_by_relay: dict[wire.DropCode, int] = {}
        self._packets_sent = 0
        self._packets_received = 0
        self._lost_in_flight = 0
        # Written by the writer: frames handed to the socket but not yet taken by it.
        self._in_flight = 0

    # ---- public surface -------------------------------------------------

    @property
    def public_key(self) -> NodeKey:
        return self.key.public

    @property
    def outbox(self) -> Outbox:
        """The send queue (a relay's mesh forwarding waits on it for flow control)."""
        return self._out

    def send_nowait(self, dest: NodeKey, payload: bytes) -> bool:
        """Queue a packet; False if the send queue is full (nothing queued)."""
        if not self._out.data.has_room(_HDR.size + _K + len(payload)):
            return False
        self._queue(dest, payload)
        return True

    async def send(self, dest: NodeKey, payload: bytes) -> None:
        """Queue a packet for ``dest``, waiting while the send queue is full.

        Cancelled, it has queued nothing; returned, the packet is queued.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._out.data.has_room(_HDR.size + _K + len(payload)):
            if self.closed_reason is not None:
                raise RelayClosedError(self.closed_reason)
            await self._space.park()
        self._queue(dest, payload)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def forward_nowait(self, src: bytes, dest: bytes, payload: bytes) -> bool:
        """Queue a ForwardPacket (mesh links only); False if the queue is full.

        Never blocks: a relay's reader calls this on its hot path.
        """
        if self.closed_reason is not None:
            return False
        frame = _HDR.pack(FrameType.FORWARD_PACKET, 2 * _K + len(payload)) + src + dest + payload
        if not self._out.data.offer(frame):
            return False
        self._out.poke()
        return True

    def forward_run_nowait(self, src: bytes, dest: bytes, payloads: Sequence[bytes]) -> int:
        """Queue a run of packets from ``src`` to ``dest`` (mesh links only); how many fit.

        When the relay takes ForwardPackets (its ServerInfo says ``forward_batch``)
        the run goes in as few of them as the frame limit allows, else as one
        ForwardPacket each. The packets that did not fit the queue are the last
        ones of the run. Never blocks: a relay's reader calls this on its hot path.
        """
        if self.closed_reason is not None:
            return 0
        total = len(payloads)
        if total == 1 or self.server_info.get("forward_batch") is not True:
            queued = 0
            while queued < total and self.forward_nowait(src, dest, payloads[queued]):
                queued += 1
            return queued
        data = self._out.data
        pack = _LEN.pack
        limit = wire.MAX_FRAME_BODY
        queued = 0
        while queued < total:
            first = payloads[queued]
            size = 2 * _K + _LEN.size + len(first)
            parts = [b"", src, dest, pack(len(first)), first]
            end = queued + 1
            while end < total:
                payload = payloads[end]
                grown = size + _LEN.size + len(payload)
                if grown > limit:
                    break
                parts += (pack(len(payload)), payload)
                size = grown
                end += 1
            if end == queued + 1:
                # One packet alone (or one too large for a ForwardPackets of its own).
                frame = (
                    _HDR.pack(FrameType.FORWARD_PACKET, 2 * _K + len(first)) + src + dest + first
                )
            else:
                parts[0] = _HDR.pack(FrameType.FORWARD_PACKETS, size)
                frame = b"".join(parts)
            if not data.offer(frame):
                break
            queued = end
        if queued:
            self._out.poke()
        return queued

    def forward_frames_nowait(self, src: bytes, dest: bytes, frames: bytes, count: int) -> int:
        """Queue a run of ``count`` packets from ``src`` to ``dest``, given as the
        RecvPacket frames ``dest`` is to get (a relay's run, relay/protocol/wire.py), for a
        mesh peer: as they are, in one ForwardRun, when the relay takes them (its
        ServerInfo says ``forward_runs``) and they fit one frame; else as
        :meth:`forward_run_nowait` would. How many were queued (all, or none of a
        ForwardRun). Never blocks."""
        if self.closed_reason is not None:
            return 0
        size = 2 * _K + len(frames)
        if self.server_info.get("forward_runs") is not True or size > wire.MAX_FRAME_BODY:
            return self.forward_run_nowait(src, dest, wire.run_payloads(frames))
        if not self._out.data.offer(_HDR.pack(FrameType.FORWARD_RUN, size) + src + dest + frames):
            return 0
        self._out.poke()
        return count

    def report_drops_nowait(self, src: bytes, code: wire.DropCode, count: int) -> bool:
        """For a mesh peer: tell the relay that ``count`` packets of its client ``src`` were
        dropped here, if it takes such reports (its ServerInfo says ``drop_reports``).
        False if it could not be queued now (not connected yet, control queue full): the
        caller may try again later."""
        if self.closed_reason is not None:
            return True  # this link is over: nobody to tell
        if not self.connected:
            return False
        if self.server_info.get("drop_reports") is not True:
            return True  # an older relay: it has no way to pass the report on
        frame = wire.encode(wire.PacketsDroppedFor(src=src, reason=code, count=count))
        if not self._out.control.offer(frame):
            return False
        self._out.poke()
        return True

    def _queue(self, dest: NodeKey, payload: bytes) -> None:
        if self.closed_reason is not None:
            raise RelayClosedError(self.closed_reason)
        if len(payload) > wire.MAX_PACKET_BYTES:
            raise ValueError(f"payload of {len(payload)} bytes is over {wire.MAX_PACKET_BYTES}")
        self._out.data.append_unchecked(
            _HDR.pack(FrameType.SEND_PACKET, _K + len(payload)) + dest.raw + payload
        )
        self._out.poke()

    async def receive(self) -> Packet:
        """The next packet for us. Raises :class:`RelayClosedError` once the client stopped."""
        try:
            return await self._recv_receive.receive()
        except trio.EndOfChannel:
            raise RelayClosedError(self.closed_reason or "closed") from None

    async def ping(self) -> float:
        """Round trip to the relay in seconds (over the WebSocket, through its queues).

        If the connection ends before the Pong, the Ping is sent again on the next one.
        """
        data = nacl.utils.random(wire.PING_BYTES)
        frame = wire.encode(wire.Ping(data=data))
        try:
            while True:
                if self.closed_reason is not None:
                    raise RelayClosedError(self.closed_reason)
                wait = self._pings[data] = _PingWait()
                start = trio.current_time()
                self._out.control.append_unchecked(frame)
                self._out.poke()
                await wait.done.wait()
                if wait.answered:
                    return trio.current_time() - start
        finally:
            self._pings.pop(data, None)

    def move_to(self, urls: Sequence[str]) -> None:
        """Reconnect to the first of ``urls`` now (a planned move: no backoff).

        Packets queued meanwhile wait and go out on the new connection.
        """
        if not urls:
            raise ValueError("at least one relay URL is needed")
        self.urls = list(urls)
        self._move_requested = True
        if self._session_scope is not None:
            self._session_scope.cancel()

    def note_preferred(self, preferred: bool) -> None:
        self._preferred = preferred
        self._out.control.append_unchecked(wire.encode(wire.NotePreferred(preferred=preferred)))
        self._out.poke()

    async def wait_connected(self) -> None:
        await trio.lowlevel.checkpoint()
        while not self.connected:
            if self.closed_reason is not None:
                raise RelayClosedError(self.closed_reason)
            await self._connected_event.wait()

    async def wait_sent(self) -> None:
        """Until everything queued so far has been handed to the socket."""
        await trio.lowlevel.checkpoint()
        while self._out or self._in_flight or not self.connected:
            if self.closed_reason is not None:
                raise RelayClosedError(self.closed_reason)
            await self._progress.park()

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            connected=self.connected,
            url=self.url,
            connects=self._connects,
            packets_sent=self._packets_sent,
            packets_received=self._packets_received,
            send_queued=len(self._out.data),
            send_queued_bytes=self._out.data.bytes,
            lost_in_flight=self._lost_in_flight,
            last_close=self._last_close,
            dropped_by_relay=sum(self.dropped_by_relay.values()),
        )

    # ---- supervisor ------------------------------------------------------

    async def run(
        self,
        *,
        first_must_succeed: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep a connection up until cancelled. started() after the first handshake.

        If ``first_must_succeed``, failing to connect to every URL once raises
        :class:`ConnectError`; otherwise started() is called at once and
        failures are retried for ever with backoff, as they are after the first
        connection.
        """
        if not first_must_succeed:
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
        try:
            await self._supervise(first_must_succeed, task_status)
        finally:
            self._shut(self.closed_reason or "closed")

    def _shut(self, why: str) -> None:
        """Stop for good: wake every waiter, so that it (and every later call) raises."""
        self.closed_reason = why
        self.connected = False
        self._recv_send.close()
        self._connected_event.set()
        self._space.unpark_all()
        self._progress.unpark_all()
        self._out.release()
        for wait in self._pings.values():
            wait.done.set()

    async def _supervise(
        self, first_must_succeed: bool, task_status: trio.TaskStatus[None]
    ) -> None:
        attempt = 0
        index = 0
        started = False
        while True:
            url = self.urls[index % len(self.urls)]
            try:
                await self._session(url, task_status if not started else None)
                started = True
                attempt = 0
            except ConnectError as exc:
                if first_must_succeed and not started and index + 1 >= len(self.urls):
                    raise
                self._last_close = str(exc)
                log.info("relay %s: %s", url, exc)
                index += 1
                attempt += 1
            except _Disconnect as exc:
                started = True
                self._last_close = exc.why
                if exc.code == CloseReason.REPLACED:
                    # Another connection with our key took over. Reconnecting would
                    # kick it off in turn, and the two would fight for ever: stop.
                    log.warning("relay %s: %s; this client stops", url, exc.why)
                    self.closed_reason = exc.why
                    return
                log.info("relay %s disconnected: %s", url, exc.why)
                attempt = 1
                if exc.code == CloseReason.GOING_AWAY and len(self.urls) > 1:
                    # The relay is shutting down: its siblings are the place to be, now.
                    index += 1
                    attempt = 0
                    self._restart_hint_s = 0.0
            if self._move_requested:
                self._move_requested = False
                index = 0
                attempt = 0
                continue
            delay = self._restart_hint_s
            self._restart_hint_s = None
            if delay is None:
                delay = self._backoff.delay(attempt)
            await trio.sleep(delay)

    async def _session(self, url: str, task_status: trio.TaskStatus[None] | None) -> None:
        try:
            with trio.fail_after(self._connect_timeout):
                ws = await connect_websocket(
                    url,
                    subprotocol=wire.SUBPROTOCOL,
                    ssl_context=self._ssl_context,
                    max_message=1024 * 1024,
                    receive_bytes=64 * 1024,
                )
        except trio.TooSlowError:
            raise ConnectError(f"{url}: cannot connect: timed out") from None
        except (OSError, trio.BrokenResourceError, HandshakeFailed) as exc:
            raise ConnectError(f"{url}: cannot connect: {_os_reason(exc)}") from None
        try:
            await self._run_session(url, ws, task_status)
        finally:
            with trio.move_on_after(1.0):
                await ws.aclose(CloseReason.NORMAL)

    async def _run_session(
        self, url: str, ws: WebSocketStream, task_status: trio.TaskStatus[None] | None
    ) -> None:
        decoder = wire.FrameDecoder(max_body=wire.MAX_HANDSHAKE_BODY)
        try:
            with trio.fail_after(self._connect_timeout):
                await self._handshake(ws, decoder)
        except trio.TooSlowError:
            raise ConnectError(f"{url}: relay did not finish the handshake in time") from None
        except ProtocolError as exc:
            raise ConnectError(f"{url}: {exc}") from None
        except WebSocketClosed as exc:
            raise ConnectError(f"{url}: relay closed the connection: {_why(exc)}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectError(
                f"{url}: connection lost in the handshake: {_os_reason(exc)}"
            ) from None
        decoder.max_body = wire.MAX_FRAME_BODY
        self.url = url
        self.connected = True
        self._connects += 1
        self._connected_event.set()
        self._progress.unpark_all()
        if task_status is not None:
            task_status.started()
        result: list[_Disconnect] = []
        try:
            with trio.CancelScope() as self._session_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, ws, decoder, nursery.cancel_scope, result)
                    nursery.start_soon(self._writer, ws, nursery.cancel_scope, result)
                    nursery.start_soon(self._watch_writes, ws, nursery.cancel_scope, result)
        finally:
            self._session_scope = None
            self.connected = False
            self._connected_event = trio.Event()
            # A Ping this connection carried will get no Pong: ping() sends it again.
            for wait in self._pings.values():
                wait.done.set()
        raise result[0] if result else _Disconnect("closed")

    async def _handshake(self, ws: WebSocketStream, decoder: wire.FrameDecoder) -> None:
        self.server_key, self.server_info = await client_handshake(
            ws,
            decoder,
            self.key,
            token=self._token,
            mesh_key=self._mesh_key,
            probe=self._probe,
            server_key=self._pinned_server_key,
            preferred=self._preferred,
            disco_key=self.disco_key,
            endpoints=self.endpoints,
        )

    # ---- the two tasks of a connection -----------------------------------

    def _keepalive_s(self) -> float:
        value = self.server_info.get("keepalive_s", 30.0)
        return float(value) if isinstance(value, int | float) and value > 0 else 30.0

    async def _reader(
        self,
        ws: WebSocketStream,
        decoder: wire.FrameDecoder,
        scope: trio.CancelScope,
        result: list[_Disconnect],
    ) -> None:
        # Silence for two keepalive periods means the relay (or the path to it) is gone.
        silence_s = 2 * self._keepalive_s() + 5
        send_packet = self._recv_send
        try:
            while True:
                with trio.move_on_after(silence_s) as timer:
                    msg = await ws.receive()
                if timer.cancelled_caught:
                    result.append(_Disconnect(f"relay silent for {silence_s:g} s"))
                    return
                decoder.receive_data(msg)
                while (frame := decoder.next_frame()) is not None:
                    ftype, body = frame
                    if ftype == FrameType.RECV_PACKET and len(body) >= _K:
                        self._packets_received += 1
                        packet = Packet(NodeKey(body[:_K]), body[_K:])
                        try:
                            send_packet.send_nowait(packet)
                        except trio.WouldBlock:
                            await send_packet.send(packet)
                    else:
                        self._on_control(wire.decode_body(ftype, body))
        except WebSocketClosed as exc:
            result.append(_closed(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            result.append(_lost(exc))
        except RemoteProtocolError as exc:
            result.append(_Disconnect(f"protocol error: {exc}"))
        finally:
            scope.cancel()

    async def _watch_writes(
        self, ws: WebSocketStream, scope: trio.CancelScope, result: list[_Disconnect]
    ) -> None:
        """End the connection when a send has made no progress for ``write_timeout_s``:
        a relay that reads nothing (while it may still send keepalives, so the reader
        sees no silence) would otherwise hold the writer, and every sender, for ever."""
        timeout = self._write_timeout
        while True:
            await trio.sleep(min(1.0, timeout / 4))
            if ws.sending_since < trio.current_time() - timeout:
                result.append(_Disconnect(f"relay took nothing for {timeout:g} s"))
                scope.cancel()
                return

    def _on_control(self, event: wire.Event | None) -> None:
        match event:
            case wire.Pong(data=data):
                wait = self._pings.get(data)
                if wait is not None:
                    wait.answered = True
                    wait.done.set()
            case wire.Ping(data=data):
                if self._out.control.offer(_PONG_HEADER + data):
                    self._out.poke()
            case wire.PeerGone(peer=peer, reason=reason):
                self.peer_gone[NodeKey(peer)] = reason
            case wire.Health(problem=problem):
                self.health = problem
            case wire.PacketsDropped(reason=reason, count=count):
                self.dropped_by_relay[reason] = self.dropped_by_relay.get(reason, 0) + count
            case wire.Restarting(reconnect_in_ms=ms):
                if len(self.urls) > 1 and self.url in self.urls:
                    # A planned restart: move to the next relay now instead of waiting
                    # for this one to come back; it goes to the end of the list.
                    i = self.urls.index(self.url)
                    self.move_to(self.urls[i + 1 :] + self.urls[: i + 1])
                else:
                    self._restart_hint_s = ms / 1000
            case _:
                pass  # KeepAlive, or a frame a newer relay sends that we can ignore

    async def _writer(
        self, ws: WebSocketStream, scope: trio.CancelScope, result: list[_Disconnect]
    ) -> None:
        out = self._out
        max_bytes = self._max_message
        keepalive = wire.encode(wire.KeepAlive())
        interval = self._keepalive_s()
        try:
            while True:
                if not await out.wait(interval):
                    out.control.append_unchecked(keepalive)
                message, packets = out.next_message(max_bytes)
                if packets:
                    # Room was freed (frames, bytes or both): every blocked sender looks.
                    self._space.unpark_all()
                self._in_flight = packets or 1
                try:
                    await ws.send(message)
                except BaseException:
                    self._lost_in_flight += packets
                    raise
                finally:
                    self._in_flight = 0
                self._packets_sent += packets
                self._progress.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            result.append(_lost(exc))
        finally:
            scope.cancel()


def _closed(exc: WebSocketClosed) -> _Disconnect:
    return _Disconnect(f"relay closed the connection: {_why(exc)}", exc.code)


def _lost(exc: BaseException) -> _Disconnect:
    return _Disconnect(f"connection lost: {_os_reason(exc)}")


class MessageSocket(Protocol):
    """What the handshake needs of an open WebSocket: a :class:`WebSocketStream`, or a
    trio-websocket connection (tests and tools that speak to a relay directly)."""

    async def get_message(self) -> bytes | str: ...

    async def send_message(self, message: bytes) -> None: ...


async def _next_event(ws: MessageSocket, decoder: wire.FrameDecoder) -> wire.Event:
    while True:
        event = decoder.next_event()
        if not isinstance(event, wire.NeedData):
            return event
        msg = await ws.get_message()
        if isinstance(msg, str):
            raise RemoteProtocolError("relay sent a text message", CloseReason.TEXT_MESSAGE)
        decoder.receive_data(msg)


async def client_handshake(
    ws: MessageSocket,
    decoder: wire.FrameDecoder,
    key: PrivateKey,
    *,
    token: str | None = None,
    mesh_key: bytes | None = None,
    probe: bool = False,
    server_key: NodeKey | None = None,
    preferred: bool = False,
    disco_key: NodeKey | None = None,
    endpoints: tuple[str, ...] = (),
) -> tuple[NodeKey, dict[str, Any]]:
    """Run the client side of the handshake on an open WebSocket.

    Returns the relay's key and its ServerInfo. Raises RemoteProtocolError if
    the relay is not who ``server_key`` says or does not follow the protocol,
    WebSocketClosed (trio-websocket's ConnectionClosed) if it refuses us.
    """
    hello = await _next_event(ws, decoder)
    if not isinstance(hello, wire.ServerKey):
        raise RemoteProtocolError(
            f"expected ServerKey, got {type(hello).__name__}", CloseReason.BAD_HANDSHAKE
        )
    got = NodeKey(hello.public_key)
    if server_key is not None and got != server_key:
        raise RemoteProtocolError(
            f"relay key {got} is not the expected {server_key}", CloseReason.BAD_HANDSHAKE
        )
    info = seal_client_info(
        key,
        hello,
        token=token,
        mesh_key=mesh_key,
        probe=probe,
        preferred=preferred,
        disco_key=disco_key,
        endpoints=endpoints,
    )
    await ws.send_message(wire.encode(info))
    reply = await _next_event(ws, decoder)
    if not isinstance(reply, wire.ServerInfo):
        raise RemoteProtocolError(
            f"expected ServerInfo, got {type(reply).__name__}", CloseReason.BAD_HANDSHAKE
        )
    return got, open_server_info(key, got, reply)


def _os_reason(exc: BaseException) -> str:
    """The operating system's reason behind a failed connect ("Connection refused"), or
    the TLS or upgrade problem, which trio may wrap in an exception group or a cause."""
    tls = describe_tls_error(exc)
    if tls is not None:
        return tls
    seen: list[BaseException] = [exc]
    for err in seen:
        if isinstance(err, OSError) and err.errno is not None and err.strerror:
            return os.strerror(err.errno)
        if isinstance(err, BaseExceptionGroup):
            seen.extend(err.exceptions)
        for nxt in (err.__cause__, err.__context__):
            if nxt is not None and nxt not in seen:
                seen.append(nxt)
    return next((str(e) for e in seen if str(e)), type(exc).__name__)


def _why(exc: WebSocketClosed) -> str:
    return f"{exc.code} {exc.reason}".rstrip()


@asynccontextmanager
async def open_relay_client(
    url: str | Sequence[str], key: PrivateKey, **options: object
) -> AsyncIterator[RelayClient]:
    """Connect to a relay (or the first reachable of several) and keep the connection up.

    Raises :class:`ConnectError` if the first connection fails. Options are
    :class:`RelayClient`'s keyword arguments.
    """
    urls = [url] if isinstance(url, str) else list(url)
    client = RelayClient(urls, key, **options)  # type: ignore[arg-type]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # One failure (a ConnectError, or the caller's own exception) is raised as
        # itself, as a plain context manager would; real groups pass through.
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc
