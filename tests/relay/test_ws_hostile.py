"""The relay's own WebSocket path (relay/wsstream.py) against a hostile peer.

Raw sockets speak to a real relay (or a WebSocketStream speaks to a raw peer):
upgrade requests whose headers are not text, a server whose answer is not,
reads full of Pings or of empty frames, a peer that keeps sending after the
relay began its close, resets and half-closes at every step, a mesh peer's
malformed ForwardRun. Each ends one connection with a counted reason (or
costs what the rules allow), never an ``internal_error``, and a normal pair
is served afterwards.
"""

from __future__ import annotations

import os
import re
import socket
import struct

import pytest
import trio
import trio.testing
from websockets.speedups import apply_mask
from wsproto.utilities import generate_accept_token

from relay.client import client_handshake
from relay.config import load_config
from relay.protocol import wire
from relay.protocol.keys import PrivateKey
from relay.protocol.websocket import (
    BINARY,
    CONTINUATION,
    PING,
    PONG,
    WebSocketError,
    encode_frame,
)
from relay.protocol.wire import CloseReason
from relay.server import RelayServer
from relay.wsstream import HandshakeFailed, WebSocketClosed, WebSocketStream, connect_websocket
from tests.conftest import start_relay, wait_until
from tests.relay.hostile import (
    closes_total,
    open_raw,
    pair_still_served,
    receive_or_reset,
    reset,
    upgrade_request,
    wait_all_counted,
)


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """One masked frame, as a client sends it (short payloads only)."""
    assert len(payload) < 126
    key = os.urandom(4)
    return (
        bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + key + apply_mask(payload, key)
    )


async def _read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """The relay's HTTP answer and the bytes after it."""
    buf = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in buf:
            data = await receive_or_reset(stream)
            if not data:
                return buf, b""
            buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head, rest


async def _open_ws(
    server: RelayServer, *, mesh_key: bytes | None = None, handshake: bool = True
) -> tuple[trio.SocketStream, WebSocketStream]:
    """A raw socket upgraded to a WebSocket (client side), through the relay handshake
    unless ``handshake`` is False."""
    s = await open_raw(server)
    await s.send_all(upgrade_request())
    head, rest = await _read_head(s)
    assert head.startswith(b"HTTP/1.1 101"), head
    ws = WebSocketStream(
        s, server_side=False, max_message=1 << 22, receive_bytes=65536, leftover=rest
    )
    if handshake:
        with trio.fail_after(10):
            await client_handshake(
                ws, wire.FrameDecoder(), PrivateKey.generate(), mesh_key=mesh_key
            )
    return s, ws


async def _close_code(ws: WebSocketStream) -> int:
    """Read until the relay closes; its close code."""
    with trio.fail_after(10):
        while True:
            try:
                await ws.receive()
            except WebSocketClosed as exc:
                return exc.code


def _request_with(old: bytes, new: bytes) -> bytes:
    request = upgrade_request()
    assert old in request
    return request.replace(old, new)


# ---- the upgrade request -------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        _request_with(b"Host: 127.0.0.1", b"Host: \xff\xfe"),
        _request_with(b"Sec-WebSocket-Protocol: derp", b"Sec-WebSocket-Protocol: derp, \xff"),
        _request_with(b"Connection: Upgrade", b"Connection: Upgrade, \xff"),
        _request_with(
            b"Upgrade: websocket\r\n", b"Upgrade: websocket\r\nSec-WebSocket-Extensions: \xff\r\n"
        ),
    ],
    ids=["host", "subprotocol", "connection", "extensions"],
)
async def test_an_upgrade_request_whose_headers_are_not_text_is_answered_400(
    nursery: trio.Nursery, request_bytes: bytes
) -> None:
    """wsproto decodes these headers (IDNA, ASCII): bytes that are not text once
    escaped as a UnicodeError, counted as internal_error and logged with a traceback."""
    server, url = await start_relay(nursery)
    s = await open_raw(server)
    await s.send_all(request_bytes)
    head, _ = await _read_head(s)
    assert head.startswith(b"HTTP/1.1 400"), head
    await s.aclose()
    await wait_all_counted(server)
    assert server.statistics().closes == {"bad_http": 1}
    await pair_still_served(url)


@pytest.mark.parametrize(
    "step", ["nothing", "half_request", "request", "half_header", "half_payload", "ping"]
)
@pytest.mark.parametrize("how", ["reset", "eof"])
async def test_a_reset_or_half_close_at_any_step_ends_only_that_connection(
    nursery: trio.Nursery, step: str, how: str
) -> None:
    server, url = await start_relay(nursery)
    sent = {
        "nothing": b"",
        "half_request": upgrade_request()[:40],
        "request": upgrade_request(),
        "half_header": upgrade_request() + client_frame(BINARY, b"x" * 100)[:3],
        "half_payload": upgrade_request() + client_frame(BINARY, b"x" * 100)[:50],
        "ping": upgrade_request() + client_frame(PING, b"p" * 125),
    }[step]
    s = await open_raw(server)
    if sent:
        await s.send_all(sent)
    if how == "reset":
        await reset(s)
    else:
        await s.send_eof()
        with trio.fail_after(10):
            while await receive_or_reset(s):
                pass
        await s.aclose()
    await wait_all_counted(server)
    closes = server.statistics().closes
    assert sum(closes.values()) == 1 and "internal_error" not in closes, closes
    await pair_still_served(url)


async def test_a_request_sent_byte_by_byte_with_a_frame_cut_after_it_is_served(
    nursery: trio.Nursery,
) -> None:
    """The request one byte per write, and the first bytes of a Ping pipelined after
    it (read with the request, kept by h11): the relay answers 101, then the Ping."""
    server, url = await start_relay(nursery)
    s = await open_raw(server)
    ping = client_frame(PING, b"early")
    data = upgrade_request() + ping[:3]
    for i in range(len(data)):
        await s.send_all(data[i : i + 1])
    head, rest = await _read_head(s)
    assert head.startswith(b"HTTP/1.1 101"), head
    ws = WebSocketStream(
        s, server_side=False, max_message=1 << 20, receive_bytes=65536, leftover=rest
    )
    with trio.fail_after(10):
        assert await ws.receive()  # ServerKey
        await s.send_all(ping[3:])
        while await s.receive_some(4096) != encode_frame(PONG, b"early", mask=False):
            pass
    await s.aclose()
    await pair_still_served(url)


async def test_a_request_that_never_ends_is_closed_at_the_preauth_deadline(
    nursery: trio.Nursery,
) -> None:
    """Header lines trickling in for ever (each write well under h11's 16 KiB bound)."""
    server, url = await start_relay(nursery, handshake_timeout_s=1)
    s = await open_raw(server)
    await s.send_all(upgrade_request()[:-2])
    with trio.fail_after(10):
        try:
            while True:
                await s.send_all(b"X-Slow: 1\r\n")
                await trio.sleep(0.05)
        except trio.BrokenResourceError:
            pass
    await s.aclose()
    await wait_all_counted(server)
    assert server.statistics().closes == {"upgrade_timeout": 1}
    await pair_still_served(url)


# ---- the client side of the upgrade ---------------------------------------


def _accepted(key: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n" + extra + b"\r\n"
    )


async def _fake_server(
    nursery: trio.Nursery, answer: bytes | None, extra: bytes = b"", after: bytes = b""
) -> int:
    """A TCP server that answers every upgrade request with ``answer`` (if None, an
    accepted upgrade carrying ``extra`` headers and followed by ``after`` in the same
    write), then holds the connection."""

    async def handler(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(4096)
            if not data:
                return
            buf += data
        found = re.search(rb"(?i)sec-websocket-key: *([^\r]+)", buf)
        assert found is not None
        answer_bytes = _accepted(found.group(1), extra) + after if answer is None else answer
        try:
            await stream.send_all(answer_bytes)
            await trio.sleep_forever()
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def _connect(port: int) -> WebSocketStream:
    with trio.fail_after(10):
        return await connect_websocket(
            f"ws://127.0.0.1:{port}/derp",
            subprotocol=wire.SUBPROTOCOL,
            max_message=1 << 20,
            receive_bytes=65536,
        )


@pytest.mark.parametrize(
    "extra",
    [
        b"Sec-WebSocket-Protocol: \xff\r\n",
        b"Sec-WebSocket-Extensions: \xff\r\n",
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n",
        b"Sec-WebSocket-Protocol: chat\r\n",
    ],
    ids=["subprotocol", "extensions", "unasked-extension", "other-subprotocol"],
)
async def test_an_accept_with_headers_that_are_not_text_fails_the_handshake(
    nursery: trio.Nursery, extra: bytes
) -> None:
    """A UnicodeError once escaped connect_websocket: RelayClient retries only
    HandshakeFailed (and OSError), so a bad answer stopped the client for good."""
    port = await _fake_server(nursery, None, extra)
    with pytest.raises(HandshakeFailed, match="not a WebSocket upgrade"):
        await _connect(port)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCB0b2tlbg==\r\n\r\n",
        b"\x82\x05hello" * 4000,
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 100_000,
        b"HTTP/1.1 101 Switching Protocols\r\nX: " + b"a" * 100_000,
    ],
    ids=["wrong-accept-token", "frames-instead-of-http", "endless-body", "endless-header"],
)
async def test_a_server_that_answers_garbage_fails_the_handshake_promptly(
    nursery: trio.Nursery, answer: bytes
) -> None:
    port = await _fake_server(nursery, answer)
    with pytest.raises(HandshakeFailed) as failed:
        await _connect(port)
    if failed.value.status == 403:
        assert len(failed.value.body) <= 4096 + 65536


async def test_frames_sent_with_the_101_are_read_and_a_masked_one_refused(
    nursery: trio.Nursery,
) -> None:
    """A server's first frames may come in the same write as its 101; a server's
    frame must not be masked (RFC 6455 §5.1): the client refuses it with 1002."""
    ws = await _connect(
        await _fake_server(nursery, None, after=encode_frame(BINARY, b"first", mask=False))
    )
    with trio.fail_after(10):
        assert await ws.receive() == b"first"
    await trio.aclose_forcefully(ws.stream)
    ws = await _connect(await _fake_server(nursery, None, after=client_frame(BINARY, b"masked")))
    with trio.fail_after(10), pytest.raises(WebSocketError) as refused:
        await ws.receive()
    assert refused.value.reason == CloseReason.PROTOCOL_ERROR
    await trio.aclose_forcefully(ws.stream)


# ---- Pings and empty frames ----------------------------------------------


async def test_a_read_full_of_pings_is_answered_by_one_pong() -> None:
    """RFC 6455 lets an endpoint answer only the last of the Pings it has not answered:
    one read of 1,000 Pings once cost 1,000 sends (a syscall each), the attacker's
    one write amplified a thousandfold."""
    ours, theirs = trio.testing.memory_stream_pair()
    ws = WebSocketStream(ours, server_side=True, max_message=1 << 20, receive_bytes=1 << 20)
    pings = b"".join(client_frame(PING, b"%d" % i) for i in range(1000))
    await theirs.send_all(pings + client_frame(BINARY, b"data"))
    with trio.fail_after(10):
        assert await ws.receive() == b"data"
    assert await theirs.receive_some() == encode_frame(PONG, b"999", mask=False)


@pytest.mark.parametrize(
    "frames",
    [
        client_frame(PING, b"p") * 200,
        client_frame(BINARY, b"", fin=False) + client_frame(CONTINUATION, b"", fin=False) * 199,
    ],
    ids=["pings", "empty-frames"],
)
async def test_websocket_frames_that_carry_nothing_count_against_the_noop_allowance(
    nursery: trio.Nursery, frames: bytes
) -> None:
    """Pings and empty data frames cost the relay work like the protocol's own frames
    that deliver nothing; they once bypassed noop_frames_per_s entirely."""
    server, url = await start_relay(nursery, noop_frames_per_s=50)
    s, _ws = await _open_ws(server)
    await s.send_all(frames)
    with trio.fail_after(10):
        await wait_until(lambda: server.statistics().rate_limited_s > 0)
    await s.aclose()
    await pair_still_served(url)


async def test_pings_before_the_client_info_count_against_the_preauth_budget(
    nursery: trio.Nursery,
) -> None:
    """Before its ClientInfo a connection may make the relay read 8,192 bytes; Pings
    (answered, and never counted) once let it go on for the whole deadline."""
    server, url = await start_relay(nursery, handshake_timeout_s=1)
    s, ws = await _open_ws(server, handshake=False)
    assert await ws.receive()  # ServerKey
    await s.send_all(client_frame(PING, b"p") * 200)
    assert await _close_code(ws) == CloseReason.BAD_HANDSHAKE
    await s.aclose()
    await wait_all_counted(server)
    assert server.statistics().closes == {"bad_handshake": 1}
    await pair_still_served(url)


# ---- writes ----------------------------------------------------------------


async def test_a_send_notes_each_time_the_socket_takes_some_of_it() -> None:
    """The write watchdog closes a connection whose socket took nothing for
    write_timeout_s: ``sending_since`` must move while a slow but steady reader takes
    a large message (it once stayed at the send's start, and such a reader was cut)."""
    a, b = trio.socket.socketpair()
    for sock in (a, b):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    ws = WebSocketStream(
        trio.SocketStream(a), server_side=True, max_message=1 << 20, receive_bytes=65536
    )
    reader = trio.SocketStream(b)
    size = 1 << 20
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ws.send, bytes(size))
        await trio.testing.wait_all_tasks_blocked()
        began = ws.sending_since
        assert began < float("inf")  # blocked: the socket is full
        got = 0
        with trio.fail_after(10):
            while got < size // 2:
                got += len(await reader.receive_some(4096))
        await trio.testing.wait_all_tasks_blocked()
        assert began < ws.sending_since < float("inf")
        with trio.fail_after(10):
            while got < size + 4:
                got += len(await reader.receive_some(65536))
    assert ws.sending_since == float("inf")
    await ws.stream.aclose()
    await reader.aclose()


async def test_a_peer_that_never_answers_the_close_is_cut_after_a_bounded_wait(
    nursery: trio.Nursery,
) -> None:
    """After a violation the relay sends its Close and waits for the peer's; a peer
    that keeps sending data instead is cut all the same (_CLOSE_TIMEOUT_S)."""
    server, url = await start_relay(nursery)
    s, _ws = await _open_ws(server)
    await s.send_all(encode_frame(BINARY, b"unmasked", mask=False))
    with trio.fail_after(10):
        try:
            while True:
                await s.send_all(client_frame(BINARY, b"more"))
                await trio.sleep(0.01)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await s.aclose()
    await wait_all_counted(server)
    assert server.statistics().closes == {"protocol_error": 1}
    await pair_still_served(url)


# ---- a mesh peer's ForwardRun ---------------------------------------------


async def test_a_malformed_forward_run_closes_only_the_link_it_came_on(
    nursery: trio.Nursery,
) -> None:
    mesh_key = bytes(range(32))
    server = RelayServer(load_config(), PrivateKey.generate(), mesh_key=mesh_key)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}/derp"
    src, dest = bytes([7] * 32), bytes([9] * 32)
    packet = wire.encode(wire.RecvPacket(src=src, payload=b"xy"))
    bodies = [
        b"",
        packet[:-1],
        packet + wire.encode(wire.RecvPacket(src=dest, payload=b"x")),
        packet + wire.encode(wire.SendPacket(dest=dest, payload=b"x")),
    ]
    for frames in bodies:
        s, ws = await _open_ws(server, mesh_key=mesh_key)
        body = src + dest + frames
        await ws.send(struct.pack(">BI", wire.FrameType.FORWARD_RUN, len(body)) + body)
        assert await _close_code(ws) == CloseReason.BAD_FRAME
        await s.aclose()
    await wait_all_counted(server)
    assert server.statistics().closes == {"bad_frame": len(bodies)}
    assert closes_total(server, "internal_error") == 0
    await pair_still_served(url)


async def test_a_send_cut_by_cancellation_fails_the_sends_waiting_behind_it() -> None:
    """Two sends never interleave: the second waits for the first; when the first is
    cancelled halfway (a partial frame on the wire), the waiting one raises instead
    of writing after the partial frame or waiting for ever."""
    a, b = trio.socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    ws = WebSocketStream(
        trio.SocketStream(a), server_side=True, max_message=1 << 20, receive_bytes=65536
    )
    second: list[BaseException] = []

    async def send_second() -> None:
        try:
            await ws.send(b"second")
        except trio.ClosedResourceError as exc:
            second.append(exc)

    first = trio.CancelScope()

    async def send_first() -> None:
        with first:
            await ws.send(bytes(1 << 20))  # blocked halfway: nobody reads

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(send_second)
        await trio.testing.wait_all_tasks_blocked()
        assert not second  # waiting behind the first
        first.cancel()
    assert len(second) == 1
    await ws.aclose(1000)  # broken: no Close frame, just closed
    b.close()
