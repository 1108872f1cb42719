"""An open WebSocket over a trio stream: relay.protocol.websocket put to work.

Theory of operation
-------------------
One task reads (:meth:`WebSocketStream.receive`), one task writes
(:meth:`WebSocketStream.send`); nothing else runs per connection. A read is
one ``receive_some`` whose binary payload goes straight to the caller: no
reader task, no channel, no message assembly (the relay protocol is a byte
stream; relay.protocol.websocket says why). The reader answers a Ping with a
Pong itself, the last Ping of a read only (RFC 6455 §5.5.3 lets an endpoint
skip Pings it has not answered yet: a read full of Pings costs one send).
Sends never interleave: a send waits while another is under way (only the
rare Pong or Close meets a writer's send that way), and a send cut short by
cancellation marks the stream broken, since the peer may have a partial
frame: no Close frame is sent after that, the TCP connection is just closed.

:attr:`WebSocketStream.sending_since` is when the send under way last made
progress (infinity when no send is under way): when it began, or when the
socket last took some of its bytes. The relay's write watchdog ends a
connection whose socket has taken nothing for too long, instead of a timeout
scope around every send; a peer that reads slowly but steadily is never cut in
the middle of a large message for being slow. Over TLS the progress is the
whole message's (the TLS stream sends it in one piece).

:meth:`aclose` is the close handshake (RFC 6455 §7.1): our Close (or the
echo of the peer's), then, if we began it, reading until the peer's Close or
EOF; the caller bounds it in time.
"""

from __future__ import annotations

import errno
import math
import ssl
from urllib.parse import urlsplit

import trio
import wsproto.events
import wsproto.utilities
from wsproto import ConnectionType
from wsproto.handshake import H11Handshake

from relay.protocol.websocket import (
    ABNORMAL,
    BINARY,
    CLOSE,
    NO_STATUS,
    PONG,
    Close,
    FrameReader,
    Ping,
    WebSocketError,
    close_payload,
    encode_frame,
    frame_header,
)

__all__ = [
    "HandshakeFailed",
    "WebSocketClosed",
    "WebSocketStream",
    "accept_upgrade",
    "connect_websocket",
    "read_upgrade_request",
    "reject_upgrade",
]


class HandshakeFailed(Exception):
    """The server did not open the WebSocket: ``status`` is its HTTP answer (None when
    it answered nothing HTTP can read), ``body`` what it said."""

    def __init__(self, message: str, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class WebSocketClosed(Exception):
    """The peer closed the WebSocket: its Close frame's code and reason, or 1006 for a
    TCP connection that ended without one."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"WebSocket closed by the peer: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class WebSocketStream:
    """One open WebSocket, server side (``from_client=True`` for what it reads) or
    client side."""

    __slots__ = (
        "_broken",
        "_idle",
        "_leftover",
        "_mask",
        "_reader",
        "_receive_bytes",
        "_sent_close",
        "_socket",
        "close_received",
        "sending_since",
        "stream",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        server_side: bool,
        max_message: int,
        receive_bytes: int,
        leftover: bytes = b"",
    ) -> None:
        self.stream = stream
        # A plain TCP stream's socket, sent to directly to see its progress (_send_all).
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._reader = FrameReader(from_client=server_side, max_message=max_message)
        self._mask = not server_side
        self._receive_bytes = receive_bytes
        # Bytes read with the HTTP upgrade that already belong to the WebSocket.
        self._leftover: bytes | bytearray = leftover
        self._broken = False
        self._sent_close = False
        self._idle: trio.Event | None = None
        self.close_received: Close | None = None
        self.sending_since = math.inf

    @property
    def max_message(self) -> int:
        return self._reader.max_message

    @max_message.setter
    def max_message(self, value: int) -> None:
        self._reader.max_message = value

    async def receive(self) -> bytes:
        """The next binary payload bytes, across message boundaries; b"" after a read
        that carried frames with nothing in them and no payload (control frames, empty
        data frames: see :attr:`noop_frames`), so that the caller can count them and
        pause before it reads on.

        Raises :class:`WebSocketClosed` once the peer closed (after the payload that
        came before its Close), :class:`~relay.protocol.websocket.WebSocketError` when
        it broke the protocol, and trio's stream errors on a reset.
        """
        reader = self._reader
        while True:
            if self.close_received is not None:
                close = self.close_received
                raise WebSocketClosed(close.code, close.reason)
            data: bytes | bytearray
            if self._leftover:
                data, self._leftover = self._leftover, b""
            else:
                data = await self.stream.receive_some(self._receive_bytes)
                if not data:
                    raise WebSocketClosed(ABNORMAL, "the connection ended without a Close frame")
            noop_before = reader.noop_frames
            payload, events = reader.receive(data)
            if events:
                ping: Ping | None = None
                for event in events:
                    if isinstance(event, Ping):
                        ping = event
                    elif isinstance(event, Close):
                        self.close_received = event
                if ping is not None:
                    # Only the last Ping of a read is answered (RFC 6455 §5.5.3 allows
                    # it): a read full of Pings costs one send, not a send per Ping.
                    await self._send_raw(encode_frame(PONG, ping.payload, mask=self._mask))
            if payload or reader.noop_frames != noop_before:
                return payload

    @property
    def noop_frames(self) -> int:
        """How many frames read so far carried nothing (control frames, empty data
        frames)."""
        return self._reader.noop_frames

    # The names trio-websocket gives these, so that code taking either kind works.
    async def get_message(self) -> bytes:
        return await self.receive()

    async def send_message(self, message: bytes) -> None:
        await self.send(message)

    async def send(self, payload: bytes) -> None:
        """Send ``payload`` as one binary message."""
        if self._mask:
            await self._send_raw(encode_frame(BINARY, payload, mask=True))
        else:
            await self._send_raw(frame_header(len(payload)) + payload)

    async def _send_raw(self, data: bytes) -> None:
        while self.sending_since != math.inf:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
        if self._broken:
            raise trio.ClosedResourceError("the stream was cut in the middle of a frame")
        self.sending_since = trio.current_time()
        try:
            await self._send_all(data)
        except BaseException:
            self._broken = True
            raise
        finally:
            self.sending_since = math.inf
            idle = self._idle
            if idle is not None:
                self._idle = None
                idle.set()

    async def _send_all(self, data: bytes) -> None:
        """``stream.send_all(data)``, noting in :attr:`sending_since` each time the socket
        takes part of it (what trio's SocketStream.send_all does, progress aside)."""
        sock = self._socket
        if sock is None:
            await self.stream.send_all(data)
            return
        try:
            with memoryview(data) as view:
                sent = await sock.send(view)
                while sent < len(view):
                    self.sending_since = trio.current_time()
                    sent += await sock.send(view[sent:])
        except OSError as exc:
            if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                raise trio.ClosedResourceError("the socket was already closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    async def aclose(self, code: int, reason: str = "") -> None:
        """Close the WebSocket (see the module's doc), then the stream. Never raises for
        a peer that is gone or misbehaves: this is the end either way."""
        try:
            if not self._broken and not self._sent_close:
                received = self.close_received
                if received is not None:
                    # Echo the peer's code (an empty Close if it gave none).
                    code, reason = received.code, ""
                self._sent_close = True
                await self._send_raw(
                    encode_frame(CLOSE, close_payload(code, reason), mask=self._mask)
                )
                if received is None and code != NO_STATUS:
                    await self._await_close()
        except (trio.BrokenResourceError, trio.ClosedResourceError, WebSocketError):
            pass
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _await_close(self) -> None:
        reader = self._reader
        while not reader.closed:
            data = await self.stream.receive_some(self._receive_bytes)
            if not data:
                return
            reader.receive(data)


async def connect_websocket(
    url: str,
    *,
    subprotocol: str | None,
    ssl_context: ssl.SSLContext | None = None,
    max_message: int,
    receive_bytes: int,
    local_address: str | None = None,
) -> WebSocketStream:
    """Open a WebSocket to ``url`` (ws:// or wss://), client side, from ``local_address``
    if given; the caller bounds it in time.

    The TLS handshake runs here, so a certificate problem raises at once (as
    trio.BrokenResourceError whose cause is the ssl error); the HTTP upgrade is
    wsproto's. Raises OSError when the TCP connect fails and :class:`HandshakeFailed`
    when the server answers with anything but an accepted upgrade.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url}")
    secure = parts.scheme == "wss"
    host = parts.hostname
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    tcp = await trio.open_tcp_stream(host, port, local_address=local_address)
    stream: trio.abc.Stream = tcp
    try:
        if secure:
            tls = trio.SSLStream(
                tcp,
                ssl_context or ssl.create_default_context(),
                server_hostname=host,
                https_compatible=True,
            )
            await tls.do_handshake()
            stream = tls
        handshake = H11Handshake(ConnectionType.CLIENT)
        host_header = host if parts.port is None else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            host_header = f"[{host}]" if parts.port is None else f"[{host}]:{port}"
        request = wsproto.events.Request(
            host=host_header, target=target, subprotocols=[subprotocol] if subprotocol else []
        )
        await stream.send_all(handshake.send(request))
        leftover = await _read_upgrade_answer(stream, handshake, receive_bytes)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return WebSocketStream(
        stream,
        server_side=False,
        max_message=max_message,
        receive_bytes=receive_bytes,
        leftover=leftover,
    )


async def _read_upgrade_answer(
    stream: trio.abc.Stream, handshake: H11Handshake, receive_bytes: int
) -> bytes:
    """Read the server's answer to the upgrade; the bytes after it (already frames)."""
    rejected: wsproto.events.RejectConnection | None = None
    body = b""
    while True:
        data = await stream.receive_some(receive_bytes)
        if not data:
            if rejected is not None:
                break
            raise HandshakeFailed("the server closed the connection before it answered")
        try:
            handshake.receive_data(bytes(data))
        except (wsproto.utilities.RemoteProtocolError, UnicodeError) as exc:
            # wsproto decodes some header values (Sec-WebSocket-Protocol, -Extensions,
            # Connection) as ASCII: bytes that are not raise UnicodeDecodeError.
            raise HandshakeFailed(
                f"the server's answer is not a WebSocket upgrade: {exc}"
            ) from None
        for event in handshake.events():
            if isinstance(event, wsproto.events.AcceptConnection):
                # The server may have sent its first frames in the same read as its answer:
                # h11 holds them (wsproto hands them to its own frame reader the same way).
                trailing: bytes = handshake._h11_connection.trailing_data[0]
                return trailing
            if isinstance(event, wsproto.events.RejectConnection):
                rejected = event
                if not event.has_body:
                    break
            elif isinstance(event, wsproto.events.RejectData):
                body += event.data
                if event.body_finished or len(body) > 4096:
                    break
        else:
            continue
        break
    assert rejected is not None
    text = body.decode(errors="replace").strip()
    detail = f": {text}" if text else ""
    raise HandshakeFailed(
        f"the server refused the upgrade with HTTP {rejected.status_code}{detail}",
        rejected.status_code,
        body,
    )


# ---- the server side of the HTTP upgrade ------------------------------------


async def read_upgrade_request(
    stream: trio.abc.Stream, handshake: H11Handshake, receive_bytes: int
) -> wsproto.events.Request:
    """Read a client's HTTP upgrade request (wsproto's server handshake); the caller
    bounds it in time (h11 bounds its size: 16 KiB).

    Raises :class:`HandshakeFailed` with ``status`` None when the peer went away
    first, and 400 when it sent what is not an upgrade request (answered 400 here,
    wsproto's answer).
    """
    while True:
        data = await stream.receive_some(receive_bytes)
        if not data:
            raise HandshakeFailed("the peer closed the connection before its request")
        try:
            handshake.receive_data(bytes(data))
        except wsproto.utilities.RemoteProtocolError as exc:
            if isinstance(exc.event_hint, wsproto.events.RejectConnection):
                await stream.send_all(handshake.send(exc.event_hint))
            raise HandshakeFailed(f"not a WebSocket upgrade request: {exc}", 400) from None
        except UnicodeError as exc:
            # wsproto decodes some header values (Host as IDNA; Sec-WebSocket-Protocol,
            # -Extensions, Connection as ASCII): bytes that are not raise a UnicodeError.
            await stream.send_all(handshake.send(wsproto.events.RejectConnection()))
            raise HandshakeFailed(f"not a WebSocket upgrade request: {exc}", 400) from None
        for event in handshake.events():
            if isinstance(event, wsproto.events.Request):
                return event


async def accept_upgrade(
    stream: trio.abc.Stream, handshake: H11Handshake, subprotocol: str | None
) -> bytes:
    """Answer the request 101; what the client sent after its request (frames it should
    have waited for the answer to send, RFC 6455 §4.1, read all the same)."""
    await stream.send_all(handshake.send(wsproto.events.AcceptConnection(subprotocol=subprotocol)))
    # h11 holds what came after the request (wsproto's own client reads its server's
    # first frames from the same place).
    early: bytes = handshake._h11_connection.trailing_data[0]
    return early


async def reject_upgrade(
    stream: trio.abc.Stream, handshake: H11Handshake, status: int, body: bytes
) -> None:
    """Answer the request with ``status`` and a plain-text ``body``."""
    head = wsproto.events.RejectConnection(
        status_code=status,
        headers=[(b"content-length", str(len(body)).encode())],
        has_body=True,
    )
    data = handshake.send(head) + handshake.send(wsproto.events.RejectData(data=body))
    await stream.send_all(data)
