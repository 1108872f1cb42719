"""The relay's WebSocket path against another implementation: the `websockets` client.

The relay reads and writes RFC 6455 frames itself (relay/protocol/websocket.py);
these tests run a client built on a different library against a real relay
over real sockets: fragmented messages with a Ping between fragments, Ping and
Pong, its close handshake in both directions, its size limit, and compression
offered but never agreed.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from relay.client import client_handshake, open_relay_client
from relay.protocol import wire
from relay.protocol.keys import PrivateKey
from relay.protocol.websocket import CLOSE, close_payload, encode_frame
from relay.protocol.wire import CloseReason
from tests.conftest import start_relay, wait_until
from tests.relay.hostile import open_raw, receive_or_reset, upgrade_request


class _Blocking:
    """What client_handshake needs of a WebSocket, over a blocking `websockets` client."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn

    async def send_message(self, message: bytes) -> None:
        await trio.to_thread.run_sync(self.conn.send, message)

    async def get_message(self) -> bytes | str:
        return await trio.to_thread.run_sync(partial(self.conn.recv, timeout=10))


async def _connect(url: str, **kwargs: Any) -> ClientConnection:
    def opened() -> ClientConnection:
        conn = connect(url, subprotocols=["derp"], ping_interval=None, proxy=None, **kwargs)
        return conn.__enter__()  # closed by _close

    return await trio.to_thread.run_sync(opened)


async def _close(conn: ClientConnection) -> None:
    await trio.to_thread.run_sync(conn.close)


async def _closed_after_sending(conn: ClientConnection, message: bytes | str) -> ConnectionClosed:
    """Handshake, send ``message``, then read until the relay closes: how it closed."""
    try:
        await client_handshake(_Blocking(conn), wire.FrameDecoder(), PrivateKey.generate())
        await trio.to_thread.run_sync(conn.send, message)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await trio.to_thread.run_sync(partial(conn.recv, timeout=10))
    finally:
        await _close(conn)
    return info.value


async def test_a_websockets_client_sends_fragments_and_pings_between_them(
    nursery: trio.Nursery,
) -> None:
    server, url = await start_relay(nursery)
    sink = PrivateKey.generate()
    payload = bytes(range(256)) * 20
    frame = wire.encode(wire.SendPacket(dest=sink.public.raw, payload=payload))
    async with open_relay_client(url, sink) as receiver:
        conn = await _connect(url)
        try:
            # No compression was agreed, though the client offered it.
            assert conn.response.headers.get("Sec-WebSocket-Extensions") is None
            await client_handshake(_Blocking(conn), wire.FrameDecoder(), PrivateKey.generate())
            pongs = []

            def fragments() -> Iterator[bytes]:
                for i in range(0, len(frame), 1000):
                    yield frame[i : i + 1000]
                    if i == 2000:
                        # A control frame between two fragments of one message.
                        pongs.append(conn.ping(b"mid-message"))

            await trio.to_thread.run_sync(conn.send, fragments())
            with trio.fail_after(10):
                got = await receiver.receive()
            assert got.payload == payload
            # The relay answered the Ping sent between fragments.
            assert await trio.to_thread.run_sync(pongs[0].wait, 10)
        finally:
            await _close(conn)
    await wait_until(lambda: server.statistics().closes.get("closed_by_peer", 0) >= 1)
    assert "protocol_error" not in server.statistics().closes


async def test_the_relay_closes_a_websockets_client_with_code_and_reason(
    nursery: trio.Nursery,
) -> None:
    server, url = await start_relay(nursery)
    closed = await _closed_after_sending(await _connect(url), "a text message")
    assert closed.rcvd is not None
    assert closed.rcvd.code == CloseReason.TEXT_MESSAGE
    assert closed.rcvd.reason.startswith("text_message: ")
    # The client answered our Close: the close handshake finished on both sides.
    assert closed.sent is not None
    assert closed.sent.code == CloseReason.TEXT_MESSAGE
    assert server.statistics().closes == {"text_message": 1}


async def test_a_message_over_the_relay_limit_is_closed_1009(nursery: trio.Nursery) -> None:
    server, url = await start_relay(nursery, max_receive_message_bytes=100_000)
    closed = await _closed_after_sending(await _connect(url, max_size=None), b"\x00" * 100_001)
    assert closed.rcvd is not None
    assert closed.rcvd.code == CloseReason.MESSAGE_TOO_BIG
    assert closed.rcvd.reason.startswith("message_too_big: ")
    assert server.statistics().closes == {"message_too_big": 1}


async def test_frames_sent_with_the_upgrade_request_are_read(nursery: trio.Nursery) -> None:
    """A client that does not wait for the 101 (RFC 6455 says it should): its Close, sent
    in the same write as the request, is read and answered at once, not left to the
    handshake deadline."""
    server, _ = await start_relay(nursery, handshake_timeout_s=30)
    stream = await open_raw(server)
    close = encode_frame(CLOSE, close_payload(1000, "early"), mask=True)
    await stream.send_all(upgrade_request() + close)
    answer = b""
    with trio.fail_after(10):
        while chunk := await receive_or_reset(stream):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 101 ")
    # The relay's ServerKey, then its Close echoing ours.
    assert answer.endswith(b"\x88\x02\x03\xe8")
    await stream.aclose()
    await wait_until(lambda: server.statistics().closes == {"closed_in_handshake": 1})
