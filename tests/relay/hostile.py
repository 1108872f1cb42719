"""What the hostile-input tests share: raw sockets, resets, sealed hostile JSON, a good pair.

A reset is a close with SO_LINGER 0: the kernel sends RST instead of FIN, so
whatever the relay does next on that socket fails (ECONNRESET, EPIPE, ENOTCONN).
"""

from __future__ import annotations

import socket
import struct

import nacl.public
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from relay.client import client_handshake, open_relay_client
from relay.protocol import wire
from relay.protocol.keys import PrivateKey
from relay.server import RelayServer
from tests.conftest import wait_until

_LINGER_0 = struct.pack("ii", 1, 0)


def upgrade_request(path: str = "/derp", subprotocol: str = "derp") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
    ).encode()


async def open_raw(server: RelayServer, source: str | None = None) -> trio.SocketStream:
    """A TCP connection to the relay, from ``source`` if given (loopback takes any 127/8)."""
    return await trio.open_tcp_stream("127.0.0.1", server.port or 0, local_address=source)


async def handshake_from(
    nursery: trio.Nursery, server: RelayServer, source: str, key: PrivateKey
) -> WebSocketConnection:
    """A normal client's connect from ``source``, up to the relay's ServerInfo."""
    ws = await wrap_client_stream(
        nursery,
        await open_raw(server, source),
        "127.0.0.1",
        "/derp",
        subprotocols=[wire.SUBPROTOCOL],
    )
    await client_handshake(ws, wire.FrameDecoder(), key)
    return ws


async def receive_or_reset(stream: trio.SocketStream) -> bytes:
    """What the relay sends next; b"" once it closed, with FIN or RST alike."""
    try:
        return await stream.receive_some(1024)
    except trio.BrokenResourceError:
        return b""


async def reset(stream: trio.SocketStream) -> None:
    """Close with RST instead of FIN."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
    await stream.aclose()


def sealed_client_info(server_key: wire.ServerKey, plain: bytes) -> bytes:
    """A ClientInfo frame whose box opens (a fresh key of our own) around ``plain``."""
    me = PrivateKey.generate()
    box = nacl.public.Box(
        nacl.public.PrivateKey(bytes.fromhex(me.to_text()[len("privkey:") :])),
        nacl.public.PublicKey(server_key.public_key),
    )
    sealed = box.encrypt(plain)
    return wire.encode(
        wire.ClientInfo(client_key=me.public.raw, nonce=sealed.nonce, sealed=sealed.ciphertext)
    )


async def read_server_key(ws: WebSocketConnection) -> wire.ServerKey:
    dec = wire.FrameDecoder()
    dec.receive_data(await ws.get_message())
    ev = dec.next_event()
    assert isinstance(ev, wire.ServerKey)
    return ev


async def pair_still_served(url: str) -> None:
    """A normal client pair connects and exchanges a packet each way, promptly."""
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    with trio.fail_after(10):
        async with open_relay_client(url, a_key) as a, open_relay_client(url, b_key) as b:
            await a.send(b_key.public, b"ping")
            assert (await b.receive()).payload == b"ping"
            await b.send(a_key.public, b"pong")
            assert (await a.receive()).payload == b"pong"


def closes_total(server: RelayServer, *labels: str) -> int:
    closes = server.statistics().closes
    return sum(closes.get(label, 0) for label in labels)


async def wait_all_counted(server: RelayServer) -> None:
    """Until every accepted connection is counted in ``closes`` (none left open)."""
    with trio.fail_after(10):
        await wait_until(
            lambda: (
                server.statistics().accepts
                == sum(server.statistics().closes.values())
                + server.statistics().clients
                + server.statistics().mesh_peers
            )
        )
