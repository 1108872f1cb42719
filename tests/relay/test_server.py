"""A real relay on loopback with real clients: delivery, drops, bad input, policy."""

from __future__ import annotations

import struct

import pytest
import trio
from trio_websocket import open_websocket_url

from relay.client import (
    ConnectError,
    RelayClient,
    RelayClosedError,
    client_handshake,
    open_relay_client,
)
from relay.config import load_config
from relay.protocol import wire
from relay.protocol.keys import NodeKey, PrivateKey
from relay.server import RelayServer
from tests.conftest import start_relay, wait_until

SEQ = struct.Struct(">I")


async def test_thousands_of_packets_each_way_none_lost_or_reordered(nursery: trio.Nursery) -> None:
    server, url = await start_relay(nursery, send_queue_packets=10_000)
    n = 3000
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    async with open_relay_client(url, a_key) as a, open_relay_client(url, b_key) as b:

        async def pump(src: RelayClient, dest: NodeKey) -> None:
            for i in range(n):
                await src.send(dest, SEQ.pack(i) + b"x" * (i % 1500))

        async def drain(dst: RelayClient, expect_src: NodeKey) -> None:
            for i in range(n):
                p = await dst.receive()
                assert p.src == expect_src
                assert SEQ.unpack(p.payload[:4])[0] == i
                assert len(p.payload) == 4 + i % 1500

        with trio.fail_after(30):
            async with trio.open_nursery() as inner:
                inner.start_soon(pump, a, b_key.public)
                inner.start_soon(pump, b, a_key.public)
                inner.start_soon(drain, b, a_key.public)
                inner.start_soon(drain, a, b_key.public)
    stats = server.statistics()
    assert stats.packets_in == 2 * n
    assert sum(stats.drops.values()) == 0
    # Coalescing: far fewer messages than packets went out.
    assert stats.messages_out < stats.packets_out


async def test_slow_receiver_drops_are_counted_and_add_up(nursery: trio.Nursery) -> None:
    server, url = await start_relay(nursery, send_queue_packets=8, write_timeout_s=30)
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    n, size = 600, 60_000  # far more than the socket buffers hold
    async with (
        open_relay_client(url, a_key) as a,
        open_relay_client(url, b_key, receive_queue_packets=1) as b,
    ):
        for i in range(n):
            await a.send(b_key.public, SEQ.pack(i) + bytes(size))
        with trio.fail_after(20):
            await a.wait_sent()
            # Everything the relay read was either delivered or counted as dropped.
            await wait_until(lambda: server.statistics().packets_in >= n)
        received: list[int] = []
        with trio.fail_after(20):
            while len(received) + server.statistics().drops["queue_full"] < n:
                received.append(SEQ.unpack((await b.receive()).payload[:4])[0])
    drops = server.statistics().drops["queue_full"]
    assert drops > 0
    assert len(received) + drops == n
    assert received == sorted(received)  # whatever survived kept its order
    assert received[-1] == n - 1  # the newest packets survive; the oldest were dropped


async def test_unknown_destination_gets_peer_gone(nursery: trio.Nursery) -> None:
    server, url = await start_relay(nursery)
    nobody = PrivateKey.generate().public
    async with open_relay_client(url, PrivateKey.generate()) as a:
        for _ in range(5):
            await a.send(nobody, b"hello?")
        with trio.fail_after(5):
            await wait_until(lambda: nobody in a.peer_gone)
            # The PeerGone may come back before the relay has read the last sends.
            await wait_until(lambda: server.statistics().drops["unknown_dest"] == 5)
    assert a.peer_gone[nobody] is wire.PeerGoneReason.NOT_HERE


async def test_peer_gone_when_a_correspondent_disconnects(nursery: trio.Nursery) -> None:
    _, url = await start_relay(nursery)
    b_key = PrivateKey.generate()
    async with open_relay_client(url, PrivateKey.generate()) as a:
        async with open_relay_client(url, b_key) as b:
            await a.send(b_key.public, b"hi")
            await b.receive()
        with trio.fail_after(5):
            await wait_until(lambda: b_key.public in a.peer_gone)
    assert a.peer_gone[b_key.public] is wire.PeerGoneReason.DISCONNECTED


async def test_ping_pong(nursery: trio.Nursery) -> None:
    _, url = await start_relay(nursery)
    async with open_relay_client(url, PrivateKey.generate()) as a:
        with trio.fail_after(5):
            rtt = await a.ping()
    assert rtt >= 0


async def test_second_connection_with_same_key_replaces_the_first(nursery: trio.Nursery) -> None:
    server, url = await start_relay(nursery)
    key = PrivateKey.generate()
    peer = PrivateKey.generate()
    async with (
        open_relay_client(url, key) as first,
        open_relay_client(url, peer) as other,
        open_relay_client(url, key) as second,
    ):
        with trio.fail_after(5), pytest.raises(RelayClosedError, match="replaced"):
            await first.receive()
        with pytest.raises(RelayClosedError):
            first.send_nowait(peer.public, b"x")
        # The newer connection is the one that gets traffic.
        await other.send(key.public, b"to the newest")
        with trio.fail_after(5):
            assert (await second.receive()).payload == b"to the newest"
    assert server.statistics().closes["replaced"] == 1


async def test_token_policy(nursery: trio.Nursery, tmp_path: object) -> None:
    server, url = await start_relay(
        nursery,
        tokens=frozenset({"let-me-in"}),
        admission={"policy": "token", "tokens_file": "unused-in-tests"},
    )
    with pytest.raises(ConnectError, match="unauthorized"):
        async with open_relay_client(url, PrivateKey.generate()):
            pass
    with pytest.raises(ConnectError, match="unauthorized"):
        async with open_relay_client(url, PrivateKey.generate(), token="wrong"):
            pass
    async with open_relay_client(url, PrivateKey.generate(), token="let-me-in") as ok:
        assert ok.connected
    assert server.statistics().closes["unauthorized"] == 2


async def test_pinned_relay_key_mismatch_is_refused(nursery: trio.Nursery) -> None:
    _, url = await start_relay(nursery)
    with pytest.raises(ConnectError, match="not the expected"):
        async with open_relay_client(
            url, PrivateKey.generate(), server_key=PrivateKey.generate().public
        ):
            pass


async def test_rate_limit_slows_the_reader_and_drops_nothing(nursery: trio.Nursery) -> None:
    server, url = await start_relay(
        nursery, rate_bytes_per_s=200_000, rate_burst_bytes=20_000, send_queue_packets=10_000
    )
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    n = 100
    async with open_relay_client(url, a_key) as a, open_relay_client(url, b_key) as b:
        for i in range(n):
            await a.send(b_key.public, SEQ.pack(i) + bytes(5000))
        with trio.fail_after(20):
            got = [SEQ.unpack((await b.receive()).payload[:4])[0] for _ in range(n)]
    assert got == list(range(n))
    stats = server.statistics()
    assert stats.rate_limited_s > 0
    assert sum(stats.drops.values()) == 0


async def test_write_timeout_drops_only_the_stuck_client(nursery: trio.Nursery) -> None:
    server, url = await start_relay(nursery, write_timeout_s=0.5, send_queue_packets=64)
    stuck_key = PrivateKey.generate()
    async with open_websocket_url(url, subprotocols=["derp"]) as stuck:
        await client_handshake(stuck, wire.FrameDecoder(), stuck_key)
        # `stuck` never reads again. Fill its socket buffers until the relay gives up on it.
        async with (
            open_relay_client(url, PrivateKey.generate()) as a,
            open_relay_client(url, (c_key := PrivateKey.generate())) as c,
        ):
            with trio.fail_after(30):
                while server.statistics().closes.get("write_timeout", 0) == 0:
                    a.send_nowait(stuck_key.public, bytes(60_000))
                    await trio.sleep(0.001)
            # Everyone else is still served.
            await a.send(c_key.public, b"still here")
            with trio.fail_after(5):
                assert (await c.receive()).payload == b"still here"
    assert not server.is_connected(stuck_key.public)


async def test_reconnect_after_relay_restart(nursery: trio.Nursery) -> None:
    key = PrivateKey.generate()
    relay_scope = trio.CancelScope()

    async def run_relay(port: int, *, task_status: trio.TaskStatus[int]) -> None:
        with relay_scope:
            async with trio.open_nursery() as inner:
                _server, url = await start_relay(inner, port=port, key=key)
                task_status.started(int(url.rsplit(":", 1)[1].split("/")[0]))

    port = await nursery.start(run_relay, 0)
    url = f"ws://127.0.0.1:{port}/derp"
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    async with open_relay_client(url, a_key) as a, open_relay_client(url, b_key) as b:
        await a.send(b_key.public, b"before")
        with trio.fail_after(5):
            assert (await b.receive()).payload == b"before"
        relay_scope.cancel()
        with trio.fail_after(5):
            await wait_until(lambda: not (a.connected or b.connected))
        relay_scope = trio.CancelScope()
        await nursery.start(run_relay, port)
        with trio.fail_after(10):
            await a.wait_connected()
            await b.wait_connected()
        await a.send(b_key.public, b"after")
        with trio.fail_after(5):
            assert (await b.receive()).payload == b"after"
        assert a.statistics().connects == 2


async def test_drain_sends_restarting_and_clients_follow(nursery: trio.Nursery) -> None:
    server, url = await start_relay(nursery)
    async with open_relay_client(url, PrivateKey.generate()) as a:
        await server.drain(reconnect_in_ms=50, grace_s=1)
        with trio.fail_after(5):
            await wait_until(lambda: a.statistics().connects >= 2)
    assert server.statistics().closes["going_away"] == 1


async def test_coalesced_messages_never_exceed_the_limit(nursery: trio.Nursery) -> None:
    """Both writers (client → relay, relay → client) stop before a frame would cross
    ``max_message_bytes``; the relay refuses client messages over 70 KiB here."""
    server, url = await start_relay(
        nursery,
        max_receive_message_bytes=70 * 1024,
        send_queue_packets=10_000,
        send_queue_bytes=64 * 1024 * 1024,
    )
    n, size = 300, 30_000
    b_key = PrivateKey.generate()
    async with open_websocket_url(url, subprotocols=["derp"]) as b:
        await client_handshake(b, wire.FrameDecoder(), b_key)
        async with open_relay_client(
            url, PrivateKey.generate(), send_queue_bytes=64 * 1024 * 1024
        ) as a:
            for i in range(n):
                assert a.send_nowait(b_key.public, SEQ.pack(i) + bytes(size))
            decoder = wire.FrameDecoder()
            got: list[int] = []
            largest = 0
            with trio.fail_after(20):
                while len(got) < n:
                    msg = await b.get_message()
                    assert isinstance(msg, bytes)
                    largest = max(largest, len(msg))
                    decoder.receive_data(msg)
                    while (ev := decoder.next_event()) is not wire.NEED_DATA:
                        if isinstance(ev, wire.RecvPacket):
                            got.append(SEQ.unpack(ev.payload[:4])[0])
            assert a.statistics().connects == 1
    assert got == list(range(n))
    assert 2 * (size + 41) <= largest <= 64 * 1024  # coalesced, and never over the limit
    assert server.statistics().closes.get("message_too_big", 0) == 0


async def test_a_forwarded_run_is_delivered_in_messages_within_the_limit(
    nursery: trio.Nursery,
) -> None:
    """A ForwardPackets from a mesh peer is queued as runs that each fit a message: its
    packets grow on the way (4 bytes of length become 37 of header and key), and no
    message to the receiver may pass ``max_message_bytes`` for it."""
    mesh_key = bytes(range(32))
    cfg = load_config(overrides={"limits": {"max_message_bytes": 4096}})
    server = RelayServer(cfg, PrivateKey.generate(), mesh_key=mesh_key)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}/derp"
    b_key = PrivateKey.generate()
    src, n = bytes([7] * 32), 400
    async with open_websocket_url(url, subprotocols=["derp"]) as b:
        await client_handshake(b, wire.FrameDecoder(), b_key)
        async with open_relay_client(url, PrivateKey.generate(), mesh_key=mesh_key) as link:
            assert link.forward_run_nowait(src, b_key.public.raw, [SEQ.pack(i) for i in range(n)])
            decoder = wire.FrameDecoder()
            got: list[int] = []
            largest = 0
            with trio.fail_after(20):
                while len(got) < n:
                    msg = await b.get_message()
                    assert isinstance(msg, bytes)
                    largest = max(largest, len(msg))
                    decoder.receive_data(msg)
                    while (ev := decoder.next_event()) is not wire.NEED_DATA:
                        if isinstance(ev, wire.RecvPacket):
                            assert ev.src == src
                            got.append(SEQ.unpack(ev.payload)[0])
    assert got == list(range(n))
    assert largest <= 4096
    st = server.statistics()
    assert st.forwarded_in == n and sum(st.drops.values()) == 0


async def test_every_packet_of_a_dropped_run_is_counted_and_reported(
    nursery: trio.Nursery,
) -> None:
    """A receiver that reads nothing: its queue's oldest entries, runs of several packets
    from one message, are dropped; the sender is told of every packet, not every run."""
    server, url = await start_relay(
        nursery,
        send_queue_packets=16,
        flow_wait_s=0,  # no waiting: straight to the drops
        write_timeout_s=30,
        drop_report_interval_s=0.05,
    )
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    n, size = 1500, 8_000  # far more than the socket buffers hold; 8 packets a message
    async with (
        open_relay_client(url, a_key) as a,
        open_relay_client(url, b_key, receive_queue_packets=1),
    ):
        for i in range(n):
            await a.send(b_key.public, SEQ.pack(i) + bytes(size))
        with trio.fail_after(20):
            await a.wait_sent()
            await wait_until(lambda: server.statistics().packets_in >= n)

        def dropped() -> int:
            drops = server.statistics().drops
            return drops["queue_full"] + drops["queue_bytes_full"]

        assert dropped() > 0
        with trio.fail_after(10):
            await wait_until(lambda: a.statistics().dropped_by_relay == dropped())


async def test_a_forward_run_is_delivered_as_it_came_and_a_forged_one_closes_the_link(
    nursery: trio.Nursery,
) -> None:
    """A ForwardRun (RecvPacket frames from one source) from a mesh peer reaches its
    receiver packet for packet; one holding a frame from another source breaks the
    protocol: that link is closed (4002, counted), the receiver's connection stays."""
    mesh_key = bytes(range(32))
    server = RelayServer(load_config(), PrivateKey.generate(), mesh_key=mesh_key)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}/derp"
    b_key = PrivateKey.generate()
    src, n = bytes([7] * 32), 300
    frames = b"".join(wire.encode(wire.RecvPacket(src=src, payload=SEQ.pack(i))) for i in range(n))
    async with open_relay_client(url, b_key) as b:
        async with open_relay_client(url, PrivateKey.generate(), mesh_key=mesh_key) as link:
            assert link.server_info.get("forward_runs") is True
            assert link.forward_frames_nowait(src, b_key.public.raw, frames, n) == n
            with trio.fail_after(20):
                got = [SEQ.unpack((await b.receive()).payload)[0] for _ in range(n)]
            assert got == list(range(n))
            forged = wire.encode(wire.RecvPacket(src=bytes(32), payload=b"x"))
            assert link.forward_frames_nowait(src, b_key.public.raw, frames[:41] + forged, 2)
            await wait_until(lambda: server.statistics().closes.get("bad_frame", 0) == 1)
        st = server.statistics()
        assert st.forwarded_in == n
        assert b.statistics().connects == 1 and b.connected
