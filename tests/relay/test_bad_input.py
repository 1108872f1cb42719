"""Bad input closes only the offending connection, with a reason, counted.

Two good clients stream numbered packets through the relay the whole time;
at the end every packet has arrived, in order.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from relay.client import client_handshake, open_relay_client
from relay.protocol import wire
from relay.protocol.handshake import seal_client_info
from relay.protocol.keys import PrivateKey
from relay.protocol.wire import CloseReason
from tests.conftest import start_relay

SEQ = struct.Struct(">I")


async def _server_key(ws: WebSocketConnection) -> wire.ServerKey:
    dec = wire.FrameDecoder()
    dec.receive_data(await ws.get_message())
    ev = dec.next_event()
    assert isinstance(ev, wire.ServerKey)
    return ev


async def _authed(ws: WebSocketConnection) -> None:
    await client_handshake(ws, wire.FrameDecoder(), PrivateKey.generate())


async def garbage_after_handshake(ws: WebSocketConnection) -> None:
    await _authed(ws)
    await ws.send_message(wire.frame_header(wire.FrameType.SEND_PACKET, 3) + b"abc")


async def oversize_length(ws: WebSocketConnection) -> None:
    await _authed(ws)
    await ws.send_message(wire.frame_header(wire.FrameType.SEND_PACKET, 10_000_000))


async def text_message(ws: WebSocketConnection) -> None:
    await _authed(ws)
    await ws.send_message("hello")


async def forward_from_a_client(ws: WebSocketConnection) -> None:
    await _authed(ws)
    await ws.send_message(
        wire.encode(wire.ForwardPacket(src=bytes(32), dest=bytes(32), payload=b""))
    )


async def forward_packets_from_a_client(ws: WebSocketConnection) -> None:
    await _authed(ws)
    run = wire.ForwardPackets(src=bytes(32), dest=bytes(32), payloads=(b"a", b"b"))
    await ws.send_message(wire.encode(run))


async def packets_dropped_from_a_client(ws: WebSocketConnection) -> None:
    await _authed(ws)
    report = wire.PacketsDropped(reason=wire.DropCode.QUEUE_FULL, count=1)
    await ws.send_message(wire.encode(report))


async def garbage_instead_of_client_info(ws: WebSocketConnection) -> None:
    await _server_key(ws)
    await ws.send_message(b"\x00\x01\x02 this is not a frame stream at all")


async def wrong_first_frame(ws: WebSocketConnection) -> None:
    await _server_key(ws)
    await ws.send_message(wire.encode(wire.Ping(data=b"12345678")))


async def box_that_does_not_open(ws: WebSocketConnection) -> None:
    sk = await _server_key(ws)
    info = seal_client_info(PrivateKey.generate(), sk)
    await ws.send_message(
        wire.encode(
            wire.ClientInfo(
                client_key=info.client_key, nonce=info.nonce, sealed=b"\x00" * len(info.sealed)
            )
        )
    )


async def replayed_client_info(ws: WebSocketConnection, recorded: list[wire.ClientInfo]) -> None:
    await _server_key(ws)
    await ws.send_message(wire.encode(recorded[0]))


async def never_finishes_handshake(ws: WebSocketConnection) -> None:
    await _server_key(ws)  # and then say nothing


async def truncated_client_info(ws: WebSocketConnection) -> None:
    await _server_key(ws)
    await ws.send_message(wire.frame_header(wire.FrameType.CLIENT_INFO, 5) + b"hello")


CASES: list[tuple[str, Callable[..., Awaitable[None]], CloseReason]] = [
    ("garbage_after_handshake", garbage_after_handshake, CloseReason.BAD_FRAME),
    ("oversize_length", oversize_length, CloseReason.FRAME_TOO_LARGE),
    ("text_message", text_message, CloseReason.TEXT_MESSAGE),
    ("forward_from_a_client", forward_from_a_client, CloseReason.UNEXPECTED_FRAME),
    (
        "forward_packets_from_a_client",
        forward_packets_from_a_client,
        CloseReason.UNEXPECTED_FRAME,
    ),
    (
        "packets_dropped_from_a_client",
        packets_dropped_from_a_client,
        CloseReason.UNEXPECTED_FRAME,
    ),
    ("garbage_instead_of_client_info", garbage_instead_of_client_info, CloseReason.FRAME_TOO_LARGE),
    ("truncated_client_info", truncated_client_info, CloseReason.BAD_FRAME),
    ("wrong_first_frame", wrong_first_frame, CloseReason.BAD_HANDSHAKE),
    ("box_that_does_not_open", box_that_does_not_open, CloseReason.BAD_HANDSHAKE),
    ("replayed_client_info", replayed_client_info, CloseReason.BAD_CHALLENGE),
    ("never_finishes_handshake", never_finishes_handshake, CloseReason.HANDSHAKE_TIMEOUT),
]


async def _expect_close(url: str, attack: Callable[..., Awaitable[None]], *args: object) -> int:
    async with open_websocket_url(url, subprotocols=["derp"]) as ws:
        with trio.fail_after(10):
            try:
                await attack(ws, *args)
                while True:
                    await ws.get_message()
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return int(exc.reason.code)
    raise AssertionError("unreachable")


async def test_each_bad_input_closes_only_its_connection(nursery: trio.Nursery) -> None:
    server, url = await start_relay(nursery, handshake_timeout_s=0.5, send_queue_packets=10_000)
    # A handshake recorded off the wire, to replay on a new connection.
    recorded: list[wire.ClientInfo] = []
    async with open_websocket_url(url, subprotocols=["derp"]) as ws:
        recorded.append(seal_client_info(PrivateKey.generate(), await _server_key(ws)))

    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    total = 2000
    received: list[int] = []
    async with open_relay_client(url, a_key) as a, open_relay_client(url, b_key) as b:
        attacks_done = trio.Event()

        async def stream() -> None:
            i = 0
            while i < total:
                await a.send(b_key.public, SEQ.pack(i))
                i += 1
                if i % 50 == 0:
                    await trio.sleep(0.005)
            await attacks_done.wait()

        async def collect() -> None:
            while len(received) < total:
                received.append(SEQ.unpack((await b.receive()).payload)[0])

        async def attacks() -> None:
            for name, attack, reason in CASES:
                args = (recorded,) if attack is replayed_client_info else ()
                code = await _expect_close(url, attack, *args)
                assert code == reason, f"{name}: closed with {code}, expected {reason!r}"
            # Not even a WebSocket: raw bytes, a wrong path, a wrong subprotocol.
            stream_ = await trio.open_tcp_stream("127.0.0.1", server.port or 0)
            async with stream_:
                await stream_.send_all(b"\x16\x03\x01 definitely not HTTP\r\n\r\n")
                with trio.fail_after(5):
                    while await stream_.receive_some(1024):
                        pass
            with pytest.raises(ConnectionRejected):
                async with open_websocket_url(url.replace("/derp", "/nope"), subprotocols=["derp"]):
                    pass
            with pytest.raises(ConnectionRejected):
                async with open_websocket_url(url, subprotocols=["chat"]):
                    pass
            attacks_done.set()

        with trio.fail_after(60):
            async with trio.open_nursery() as inner:
                inner.start_soon(stream)
                inner.start_soon(collect)
                inner.start_soon(attacks)

    assert received == list(range(total))
    closes = server.statistics().closes
    for _, _, reason in CASES:
        assert closes[reason.label] >= 1, reason
    assert closes["bad_path"] == 1 and closes["bad_subprotocol"] == 1
    assert sum(server.statistics().drops.values()) == 0
