"""RelayClient under many concurrent callers: nobody waits for ever.

Each awaitable that several tasks may call at once (send, receive, ping,
wait_sent, wait_connected) is called by many tasks together; every call
must finish, or raise RelayClosedError once the client stops.
"""

from __future__ import annotations

import struct
from collections import defaultdict

import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection, WebSocketRequest, serve_websocket

from relay.client import RelayClient, RelayClosedError, open_relay_client
from relay.protocol import wire
from relay.protocol.handshake import new_challenge, open_client_info, seal_server_info
from relay.protocol.keys import PrivateKey
from relay.server import RelayServer
from tests.conftest import start_relay, wait_until

SEQ = struct.Struct(">II")


async def test_fifty_senders_on_a_queue_of_one_all_finish_and_all_arrive(
    nursery: trio.Nursery,
) -> None:
    _server, url = await start_relay(nursery, send_queue_packets=10_000)
    senders, each = 50, 20
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    async with (
        open_relay_client(url, a_key, send_queue_packets=1) as a,
        open_relay_client(url, b_key) as b,
    ):
        got: dict[int, list[int]] = defaultdict(list)

        async def sender(i: int) -> None:
            for n in range(each):
                await a.send(b_key.public, SEQ.pack(i, n))

        async def drain() -> None:
            for _ in range(senders * each):
                i, n = SEQ.unpack((await b.receive()).payload)
                got[i].append(n)

        with trio.fail_after(20):
            async with trio.open_nursery() as inner:
                inner.start_soon(drain)
                for i in range(senders):
                    inner.start_soon(sender, i)
        # Every packet exactly once, each sender's in its order.
        assert got == {i: list(range(each)) for i in range(senders)}
        assert a.statistics().packets_sent == senders * each


async def test_many_pings_and_wait_sent_at_once(nursery: trio.Nursery) -> None:
    _server, url = await start_relay(nursery, send_queue_packets=10_000)
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    async with (
        open_relay_client(url, a_key, send_queue_packets=1) as a,
        open_relay_client(url, b_key) as b,
    ):
        rtts: list[float] = []

        async def pinger() -> None:
            rtts.append(await a.ping())

        async def sender_then_flush(i: int) -> None:
            await a.send(b_key.public, SEQ.pack(i, 0))
            await a.wait_sent()

        with trio.fail_after(20):
            async with trio.open_nursery() as inner:
                for i in range(30):
                    inner.start_soon(pinger)
                    inner.start_soon(sender_then_flush, i)
            received = {SEQ.unpack((await b.receive()).payload)[0] for _ in range(30)}
        assert len(rtts) == 30 and all(r > 0 for r in rtts)
        assert received == set(range(30))


async def test_every_waiter_raises_when_the_client_stops() -> None:
    """Blocked send, receive, ping, wait_sent and wait_connected all end when run() ends.

    The relay URL is a port that accepts TCP (the kernel's backlog) and never
    answers, so the client stays unconnected and every caller blocks.
    """
    callers = 10
    sock = trio.socket.socket()
    with sock:
        await sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        port = sock.getsockname()[1]
        client = RelayClient(
            [f"ws://127.0.0.1:{port}/derp"],
            PrivateKey.generate(),
            send_queue_packets=1,
            connect_timeout_s=60,
        )
        assert client.send_nowait(PrivateKey.generate().public, b"fills the queue")
        outcomes: list[str] = []

        async def call(name: str) -> None:
            try:
                if name == "send":
                    await client.send(client.public_key, b"x")
                elif name == "receive":
                    await client.receive()
                elif name == "ping":
                    await client.ping()
                elif name == "wait_sent":
                    await client.wait_sent()
                else:
                    await client.wait_connected()
            except RelayClosedError:
                outcomes.append(name)

        names = ["send", "receive", "ping", "wait_sent", "wait_connected"]
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                run_scope = trio.CancelScope()

                async def run_client() -> None:
                    with run_scope:
                        await client.run(first_must_succeed=False)

                nursery.start_soon(run_client)
                for name in names:
                    for _ in range(callers):
                        nursery.start_soon(call, name)
                await trio.testing.wait_all_tasks_blocked()
                assert outcomes == [] and not client.connected
                run_scope.cancel()
        assert sorted(outcomes) == sorted(names * callers)
        # And after: every call raises at once instead of waiting.
        with pytest.raises(RelayClosedError):
            await client.send(client.public_key, b"late")
        with pytest.raises(RelayClosedError):
            await client.receive()
        with pytest.raises(RelayClosedError):
            await client.ping()


async def _binary(ws: WebSocketConnection) -> bytes:
    msg = await ws.get_message()
    assert isinstance(msg, bytes)
    return msg


async def test_ping_whose_connection_dropped_is_sent_again(nursery: trio.Nursery) -> None:
    """A relay swallows the first Ping and drops the connection; the next connection answers."""
    key = PrivateKey.generate()
    connections = 0
    swallowed = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        ws = await request.accept()
        challenge = new_challenge()
        await ws.send_message(
            wire.encode(wire.ServerKey(public_key=key.public.raw, challenge=challenge))
        )
        decoder = wire.FrameDecoder(max_body=wire.MAX_HANDSHAKE_BODY)
        decoder.receive_data(await _binary(ws))
        info = decoder.next_event()
        assert isinstance(info, wire.ClientInfo)
        hello = open_client_info(key, challenge, info)
        await ws.send_message(wire.encode(seal_server_info(key, hello.client_key, {})))
        decoder.max_body = wire.MAX_FRAME_BODY
        while True:
            decoder.receive_data(await _binary(ws))
            while not isinstance(event := decoder.next_event(), wire.NeedData):
                if isinstance(event, wire.Ping):
                    if first:
                        swallowed.set()
                        await ws.aclose()
                        return
                    await ws.send_message(wire.encode(wire.Pong(data=event.data)))

    server = await nursery.start(
        lambda task_status: serve_websocket(
            handler, "127.0.0.1", 0, ssl_context=None, task_status=task_status
        )
    )
    url = f"ws://127.0.0.1:{server.port}/derp"
    async with open_relay_client(url, PrivateKey.generate(), server_key=key.public) as client:
        with trio.fail_after(10):
            rtt = await client.ping()
        assert swallowed.is_set() and rtt > 0
        assert client.statistics().connects == 2


async def test_a_relay_that_reads_nothing_is_given_up_on_after_the_write_timeout(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay completes the handshake and keeps sending keepalives, but never reads:
    the client's writer blocks once the socket buffers are full, and its write watchdog
    ends the connection (and the client reconnects) instead of waiting for ever."""

    async def reads_nothing(self: RelayServer, client: object, decoder: object) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(RelayServer, "_read_loop", reads_nothing)
    _, url = await start_relay(nursery, keepalive_interval_s=0.2)
    async with open_relay_client(url, PrivateKey.generate(), write_timeout_s=0.5) as client:
        payload = bytes(wire.MAX_PACKET_BYTES)
        dest = PrivateKey.generate().public

        async def flood() -> None:
            while True:
                await client.send(dest, payload)

        async with trio.open_nursery() as inner:
            inner.start_soon(flood)
            with trio.fail_after(30):
                await wait_until(lambda: client.statistics().connects >= 2)
            inner.cancel_scope.cancel()
        assert "took nothing for 0.5 s" in (client.statistics().last_close or "")
