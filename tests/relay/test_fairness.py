"""One connection cannot starve the others, and queued bytes stay bounded.

Each flood test runs a live relay, a flooding connection and a victim pair.
The flood is a fixed amount of work (1 MiB messages of tiny frames) that
ends with a marker packet to a watcher client. The victim exchanges
numbered packets in lock step (each waits for the previous one) and then
pings the relay; the test asserts that all of that completed while the
relay was still working through the flood (the watcher has not had the
marker yet). That is counted, not timed: a relay that handles a whole 1 MiB
message without letting other connections run gets through the flood in a
few of the victim's steps; one that yields every few dozen frames needs
thousands.

Two mechanisms are tested apart: the turns a reader takes (with the budget
for frames that deliver nothing switched off), and that budget (which
pauses the flooder). Ratios of throughput belong to ``relaymesh bench
--scenario fairness``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from contextlib import AsyncExitStack

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url, wrap_client_stream

from relay.client import RelayClient, client_handshake, open_relay_client
from relay.metrics import relay_registry, render
from relay.protocol import wire
from relay.protocol.keys import PrivateKey
from tests.conftest import start_relay, wait_until
from tests.relay.hostile import open_raw, reset

SEQ = struct.Struct(">I")
MESSAGE_BYTES = 1024 * 1024
FLOOD_MESSAGES = 8
VICTIM_STEPS = 40
UNKNOWN_TYPE = 0x7F


def _packed(frame: bytes, limit: int = MESSAGE_BYTES) -> bytes:
    return frame * (limit // len(frame))


def keepalives() -> bytes:
    return _packed(wire.encode(wire.KeepAlive()))


def pings() -> bytes:
    return _packed(wire.encode(wire.Ping(data=b"12345678")))


def sends_to_absent_keys() -> bytes:
    absent = PrivateKey.generate().public.raw
    return _packed(wire.encode(wire.SendPacket(dest=absent, payload=b"")))


async def victim_exchange(a: RelayClient, b: RelayClient) -> None:
    """Numbered packets a → b in lock step, then a relay ping round trip."""
    for i in range(VICTIM_STEPS):
        await a.send(b.public_key, SEQ.pack(i))
        packet = await b.receive()
        assert packet.src == a.public_key
        assert SEQ.unpack(packet.payload) == (i,)
    await a.ping()


FLOODS = pytest.mark.parametrize(
    "flood",
    [keepalives, pings, sends_to_absent_keys],
    ids=["keepalive-packed", "ping-packed", "absent-keys"],
)


@FLOODS
async def test_victim_pair_is_served_while_one_connection_floods(
    nursery: trio.Nursery, flood: Callable[[], bytes]
) -> None:
    """The relay takes a message in turns of frames_per_turn frames, and lets the other
    connections run between two turns."""
    server, url = await start_relay(nursery, send_queue_packets=10_000, noop_frames_per_s=0)
    message = flood()
    async with (
        open_relay_client(url, PrivateKey.generate()) as a,
        open_relay_client(url, PrivateKey.generate()) as b,
        open_relay_client(url, PrivateKey.generate()) as watcher,
        open_websocket_url(url, subprotocols=["derp"], max_message_size=4 * MESSAGE_BYTES) as ws,
    ):
        await client_handshake(ws, wire.FrameDecoder(), PrivateKey.generate())
        marker = wire.encode(wire.SendPacket(dest=watcher.public_key.raw, payload=b"flood done"))
        started = trio.Event()

        async def flood_then_mark() -> None:
            for _ in range(FLOOD_MESSAGES):
                await ws.send_message(message)
                started.set()
            await ws.send_message(marker)

        async def drain_replies() -> None:
            # The flooder reads what comes back (pongs, peer gone), so the flood goes on
            # for as long as the relay takes; test_pongs_to_a_client_that_never_reads
            # covers one that does not.
            while True:
                await ws.get_message()

        with trio.fail_after(120):
            async with trio.open_nursery() as flooding:
                flooding.start_soon(flood_then_mark)
                flooding.start_soon(drain_replies)
                await started.wait()
                await victim_exchange(a, b)
                # The victim was served while the relay still had flood to go through.
                assert watcher.statistics().packets_received == 0
                # The flood is real: the marker does come through once it is done.
                packet = await watcher.receive()
                assert packet.payload == b"flood done"
                flooding.cancel_scope.cancel()
    assert server.statistics().closes.get("internal_error", 0) == 0
    assert server.statistics().rate_limited_s == 0


@FLOODS
async def test_frames_that_deliver_nothing_are_limited_per_connection(
    nursery: trio.Nursery, flood: Callable[[], bytes]
) -> None:
    """Past noop_frames_per_s the flooder's reader pauses: the relay spends next to nothing
    on it, and the victim is served long before the flood is through."""
    server, url = await start_relay(nursery, noop_frames_per_s=1000)
    message = flood()
    async with (
        open_relay_client(url, PrivateKey.generate()) as a,
        open_relay_client(url, PrivateKey.generate()) as b,
        open_relay_client(url, PrivateKey.generate()) as watcher,
        trio.open_nursery() as flooding,
    ):
        stream = await open_raw(server)
        ws = await wrap_client_stream(
            flooding,
            stream,
            "127.0.0.1",
            "/derp",
            subprotocols=["derp"],
            max_message_size=4 * MESSAGE_BYTES,
        )
        await client_handshake(ws, wire.FrameDecoder(), PrivateKey.generate())
        marker = wire.encode(wire.SendPacket(dest=watcher.public_key.raw, payload=b"flood done"))

        async def flood_then_mark() -> None:
            # The relay reads the flood only as fast as the budget allows, so TCP holds
            # the flooder's sends back: they run beside the victim, not before it.
            await ws.send_message(message)
            await ws.send_message(marker)

        flooding.start_soon(flood_then_mark)
        with trio.fail_after(60):
            await wait_until(lambda: server.statistics().rate_limited_s > 0)
            await victim_exchange(a, b)
        assert watcher.statistics().packets_received == 0
        # Victims are not paused: only the flooder was.
        assert a.statistics().connects == b.statistics().connects == 1
        # The relay is still reading the flood: end it with a reset, not a Close that
        # would wait behind the rest of the flood.
        flooding.cancel_scope.cancel()
        await reset(stream)


async def test_victim_pair_is_served_while_one_connection_floods_before_its_handshake(
    nursery: trio.Nursery,
) -> None:
    """Frames of unknown type before ClientInfo: the relay skips them, but from a connection
    that has proved nothing it reads only 8,192 bytes; at the deadline it closes it with
    4005."""
    server, url = await start_relay(nursery, handshake_timeout_s=0.5)
    unknown = _packed(wire.frame_header(UNKNOWN_TYPE, 0), 4096)
    closes: list[int | None] = []
    async with (
        open_relay_client(url, PrivateKey.generate()) as a,
        open_relay_client(url, PrivateKey.generate()) as b,
    ):

        async def flood() -> None:
            while True:
                async with open_websocket_url(url, subprotocols=["derp"]) as ws:
                    await ws.get_message()  # ServerKey
                    try:
                        while True:
                            await ws.send_message(unknown)
                    except ConnectionClosed as exc:
                        closes.append(exc.reason.code if exc.reason else None)

        with trio.fail_after(60):
            async with trio.open_nursery() as flooding:
                flooding.start_soon(flood)
                await wait_until(lambda: closes)
                await victim_exchange(a, b)
                await wait_until(lambda: len(closes) >= 2)
                flooding.cancel_scope.cancel()
    assert set(closes) == {wire.CloseReason.BAD_HANDSHAKE}
    assert server.statistics().closes["bad_handshake"] >= 2


async def test_pongs_to_a_client_that_never_reads_stay_bounded(nursery: trio.Nursery) -> None:
    """A Ping flood from a client that reads nothing: its pongs wait in a bounded control
    queue; the rest are dropped and counted, nothing grows."""
    cap = 16
    server, url = await start_relay(
        nursery, control_queue_frames=cap, write_timeout_s=60, noop_frames_per_s=0
    )
    message = pings()
    async with open_websocket_url(url, subprotocols=["derp"]) as ws:
        key = PrivateKey.generate()
        await client_handshake(ws, wire.FrameDecoder(), key)
        with trio.fail_after(60):
            for _ in range(FLOOD_MESSAGES):
                await ws.send_message(message)
            await wait_until(lambda: server.statistics().drops["control_queue_full"] >= 100_000)
        [st] = [c for c in server.client_statistics() if c.key == str(key.public)]
        assert st.control_queued <= cap
        assert st.data_queued_bytes == 0


async def test_slow_receivers_cannot_make_queued_bytes_exceed_the_bounds(
    nursery: trio.Nursery,
) -> None:
    """Receivers that never read: one's queue stops at send_queue_bytes (its oldest packets
    dropped), all of theirs together at total_queue_bytes (new packets dropped)."""
    per_client, total = 512 * 1024, 1536 * 1024
    server, url = await start_relay(
        nursery,
        send_queue_packets=100_000,
        send_queue_bytes=per_client,
        total_queue_bytes=total,
        write_timeout_s=120,
    )
    payload = bytes(60_000)
    highest = 0

    def check() -> dict[str, int]:
        nonlocal highest
        st = server.statistics()
        assert st.queued_bytes_limit == total
        assert st.queued_bytes <= total
        assert sum(c.data_queued_bytes for c in server.client_statistics()) == st.queued_bytes
        assert all(c.data_queued_bytes <= per_client for c in server.client_statistics())
        highest = max(highest, st.queued_bytes)
        return st.drops

    async with AsyncExitStack() as stack:
        sender = await stack.enter_async_context(
            open_relay_client(url, PrivateKey.generate(), send_queue_packets=64)
        )
        keys = []
        for _ in range(6):
            ws = await stack.enter_async_context(
                open_websocket_url(url, subprotocols=["derp"], disconnect_timeout=0.1)
            )
            key = PrivateKey.generate()
            await client_handshake(ws, wire.FrameDecoder(), key)
            keys.append(key.public)
        with trio.fail_after(120):
            # One slow receiver: its queue fills to its own bound, then drops its oldest.
            while check()["queue_bytes_full"] == 0:
                for _ in range(8):
                    await sender.send(keys[0], payload)
                await sender.wait_sent()
            assert check()["relay_queue_full"] == 0
            # All of them: together they reach the relay's bound, and new packets are dropped.
            while check()["relay_queue_full"] == 0:
                for key in keys[1:]:
                    await sender.send(key, payload)
                await sender.wait_sent()
    assert highest > total - len(payload) - 64
    # The same figures reach /metrics: the gauge, and the drops by reason.
    text = render(relay_registry(server)).decode()
    queued = re.search(r"^relaymesh_queued_bytes\{[^}]*\} (\S+)$", text, re.M)
    assert queued is not None and float(queued.group(1)) <= total
    for reason in ("queue_bytes_full", "relay_queue_full"):
        line = rf'^relaymesh_packets_dropped_total\{{[^}}]*reason="{reason}"[^}}]*\}} (\S+)$'
        found = re.search(line, text, re.M)
        assert found is not None and float(found.group(1)) > 0
