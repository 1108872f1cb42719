"""Flow control: a fast sender is slowed, not dropped; what is still dropped is reported.

Counted, not timed. A sender blasts numbered packets as fast as its client
queues them to a receiver that reads slowly but steadily (it stops for a
moment every few dozen packets): every packet must arrive, in order, within
one relay and across a mesh hop. Without flow control the same run drops
(the receiver's queue at the relay holds 2 MiB; the run sends many times
that faster than it is read). A receiver that reads nothing at all must not
stop the same sender's packets to a healthy receiver; its own drops reach
the sender in PacketsDropped frames, counted by the SDK.
"""

from __future__ import annotations

import struct

import trio
from trio_websocket import open_websocket_url

from coordinator.store import open_memory_store
from relay.client import RelayClient, client_handshake, open_relay_client
from relay.config import load_config
from relay.node import NodeInfo, serve_relay_node
from relay.protocol import wire
from relay.protocol.keys import NodeKey, PrivateKey
from tests.conftest import start_relay, wait_until

SEQ = struct.Struct(">I")
SIZE = 16 * 1024
#: 48 MiB: far more than the receiver's queue at the relay and the sockets' buffers hold.
PACKETS = 3000
MESH_KEY = b"0123456789abcdef0123456789abcdef"


async def blast(sender: RelayClient, dests: list[NodeKey], n: int) -> None:
    """``n`` numbered packets to each of ``dests`` in turn, as fast as the client queues them."""
    pad = bytes(SIZE - SEQ.size)
    for i in range(n):
        payload = SEQ.pack(i) + pad
        for dest in dests:
            await sender.send(dest, payload)
    await sender.wait_sent()


async def drain_slowly(receiver: RelayClient, n: int) -> list[int]:
    """Sequence numbers received until the last one (``n - 1``), pausing every 32 packets."""
    got: list[int] = []
    while not got or got[-1] != n - 1:
        packet = await receiver.receive()
        got.append(SEQ.unpack_from(packet.payload)[0])
        if len(got) % 32 == 0:
            await trio.sleep(0.002)
    return got


async def test_fast_sender_to_a_slow_receiver_loses_nothing(nursery: trio.Nursery) -> None:
    server, url = await start_relay(nursery)
    a, b = PrivateKey.generate(), PrivateKey.generate()
    async with (
        open_relay_client(url, a) as sender,
        open_relay_client(url, b, receive_queue_packets=16) as receiver,
        trio.open_nursery() as inner,
    ):
        inner.start_soon(blast, sender, [b.public], PACKETS)
        with trio.fail_after(120):
            got = await drain_slowly(receiver, PACKETS)
    assert got == list(range(PACKETS))
    st = server.statistics()
    assert sum(st.drops.values()) == 0
    # The receiver was slower: the sender's reader did wait.
    assert st.flow_waited_s > 0
    assert sender.statistics().dropped_by_relay == 0


async def start_node(  # type: ignore[no-untyped-def]
    nursery: trio.Nursery, store, region: str, name: str, **limits: object
) -> NodeInfo:
    cfg = load_config(
        overrides={
            "limits": limits,
            "relay": {"port": 0, "http_port": 0, "stun_port": 0, "region": region, "name": name},
            "mesh": {"lease_ttl_s": 2, "keepalive_interval_s": 0.5},
            "health": {"enabled": False},
        }
    )
    info: NodeInfo = await nursery.start(
        lambda task_status: serve_relay_node(
            cfg, store=store, mesh_key=MESH_KEY, task_status=task_status
        )
    )
    return info


async def test_fast_sender_to_a_slow_receiver_across_a_mesh_hop_loses_nothing(
    nursery: trio.Nursery,
) -> None:
    async with open_memory_store() as store:
        eu = await start_node(nursery, store, "eu", "eu-1")
        us = await start_node(nursery, store, "us", "us-1")
        assert eu.state is not None and us.state is not None
        a, b = PrivateKey.generate(), PrivateKey.generate()
        async with (
            open_relay_client(eu.ws_url, a) as sender,
            open_relay_client(us.ws_url, b, receive_queue_packets=16) as receiver,
        ):
            with trio.fail_after(10):
                await wait_until(lambda: eu.state.route(b.public.raw) is not None)
            async with trio.open_nursery() as inner:
                inner.start_soon(blast, sender, [b.public], PACKETS)
                with trio.fail_after(120):
                    got = await drain_slowly(receiver, PACKETS)
        assert got == list(range(PACKETS))
        assert us.server.statistics().forwarded_in == PACKETS
        for node in (eu, us):
            assert sum(node.server.statistics().drops.values()) == 0
        assert eu.mesh is not None
        [link] = eu.mesh.statistics()
        assert link.drops == 0
        # Runs of the sender's packets crossed the link in ForwardPackets frames.
        assert link.packets_sent == PACKETS
        assert link.frames_sent < PACKETS
        # Back-pressure crossed the link: the far relay's reader of it waited.
        assert us.server.statistics().flow_waited_s > 0


async def test_a_receiver_that_reads_nothing_does_not_stop_the_senders_other_flows(
    nursery: trio.Nursery,
) -> None:
    server, url = await start_relay(nursery, write_timeout_s=120, drop_report_interval_s=0.05)
    a, healthy = PrivateKey.generate(), PrivateKey.generate()
    stuck = PrivateKey.generate()
    async with (
        open_relay_client(url, a) as sender,
        open_relay_client(url, healthy) as receiver,
        # A connection that completes its handshake and then reads nothing.
        open_websocket_url(url, subprotocols=["derp"], disconnect_timeout=0.1) as ws,
    ):
        await client_handshake(ws, wire.FrameDecoder(), stuck)
        async with trio.open_nursery() as inner:
            inner.start_soon(blast, sender, [stuck.public, receiver.public_key], PACKETS)
            with trio.fail_after(120):
                got = await drain_slowly(receiver, PACKETS)
        assert got == list(range(PACKETS))

        def dropped() -> int:
            drops = server.statistics().drops
            return drops["queue_full"] + drops["queue_bytes_full"]

        # The stuck receiver's packets were dropped, each one reported to their sender.
        assert dropped() > 0
        with trio.fail_after(10):
            await wait_until(lambda: sender.statistics().dropped_by_relay == dropped())
        assert set(sender.dropped_by_relay) == {wire.DropCode.QUEUE_FULL}
        st = server.statistics()
        assert st.flow_gave_up >= 1
        assert sum(st.drops.values()) == dropped()


async def test_drops_at_the_far_relay_are_reported_to_the_sender(nursery: trio.Nursery) -> None:
    """A receiver on us that reads nothing: its packets from a sender on eu are dropped
    at us, which tells eu (PacketsDroppedFor), which tells the sender: every drop."""
    fast = {"write_timeout_s": 120, "drop_report_interval_s": 0.05}
    async with open_memory_store() as store:
        eu = await start_node(nursery, store, "eu", "eu-1", **fast)
        us = await start_node(nursery, store, "us", "us-1", **fast)
        assert eu.state is not None
        a, stuck = PrivateKey.generate(), PrivateKey.generate()
        async with (
            open_relay_client(eu.ws_url, a) as sender,
            open_websocket_url(us.ws_url, subprotocols=["derp"], disconnect_timeout=0.1) as ws,
        ):
            await client_handshake(ws, wire.FrameDecoder(), stuck)
            with trio.fail_after(10):
                await wait_until(lambda: eu.state.route(stuck.public.raw) is not None)
            with trio.fail_after(120):
                await blast(sender, [stuck.public], PACKETS)

            def dropped() -> int:
                drops = us.server.statistics().drops
                return drops["queue_full"] + drops["queue_bytes_full"]

            with trio.fail_after(30):
                await wait_until(lambda: dropped() > 0)
                await wait_until(lambda: sender.statistics().dropped_by_relay == dropped())
            assert set(sender.dropped_by_relay) == {wire.DropCode.QUEUE_FULL}
            # Nothing was dropped on the sender's side of the hop.
            assert sum(eu.server.statistics().drops.values()) == 0


def queued_frames(client: RelayClient) -> list[wire.Event]:
    decoder = wire.FrameDecoder()
    data = client.outbox.data
    while data:
        decoder.receive_data(data.popleft())
    events = []
    while (event := decoder.next_event()) is not wire.NEED_DATA:
        assert not isinstance(event, wire.NeedData)
        events.append(event)
    return events


def test_a_run_goes_in_forward_packets_frames_below_the_frame_limit() -> None:
    """Runs are cut so that no ForwardPackets body passes the frame limit; a packet too
    large to share one goes alone as a ForwardPacket; an older relay gets ForwardPacket only."""
    link = RelayClient(["ws://127.0.0.1:1/derp"], PrivateKey.generate())
    src, dest = bytes(range(32)), bytes(range(32, 64))
    run = [bytes([i]) * 20_000 for i in range(7)] + [bytes(wire.MAX_PACKET_BYTES), b"tail"]
    assert link.forward_run_nowait(src, dest, run) == len(run)
    older = queued_frames(link)
    assert older == [wire.ForwardPacket(src=src, dest=dest, payload=p) for p in run]
    link.server_info = {"forward_batch": True}
    assert link.forward_run_nowait(src, dest, run) == len(run)
    frames = queued_frames(link)
    assert frames == [
        wire.ForwardPackets(src=src, dest=dest, payloads=tuple(run[0:3])),
        wire.ForwardPackets(src=src, dest=dest, payloads=tuple(run[3:6])),
        wire.ForwardPacket(src=src, dest=dest, payload=run[6]),
        wire.ForwardPacket(src=src, dest=dest, payload=run[7]),
        wire.ForwardPacket(src=src, dest=dest, payload=run[8]),
    ]
    for frame in frames:
        assert len(wire.encode(frame)) - wire.HEADER_BYTES <= wire.MAX_FRAME_BODY


def test_a_run_of_frames_goes_as_one_forward_run_where_the_relay_takes_them() -> None:
    """A relay's run (RecvPacket frames) crosses a link as it is, in one ForwardRun, to a
    relay whose ServerInfo says ``forward_runs``; to an older one as ForwardPackets, and
    to one older still as ForwardPacket; too large for one frame, it is split."""
    src, dest = bytes(range(32)), bytes(range(32, 64))
    payloads = [bytes([i]) * 1000 for i in range(5)]
    frames = b"".join(wire.encode(wire.RecvPacket(src=src, payload=p)) for p in payloads)
    for info, want in (
        (
            {"forward_runs": True, "forward_batch": True},
            [wire.ForwardRun(src=src, dest=dest, frames=frames)],
        ),
        (
            {"forward_batch": True},
            [wire.ForwardPackets(src=src, dest=dest, payloads=tuple(payloads))],
        ),
        ({}, [wire.ForwardPacket(src=src, dest=dest, payload=p) for p in payloads]),
    ):
        link = RelayClient(["ws://127.0.0.1:1/derp"], PrivateKey.generate())
        link.server_info = info
        assert link.forward_frames_nowait(src, dest, frames, len(payloads)) == len(payloads)
        assert queued_frames(link) == want
    big = [bytes(40_000), bytes(40_000)]
    frames = b"".join(wire.encode(wire.RecvPacket(src=src, payload=p)) for p in big)
    link.server_info = {"forward_runs": True, "forward_batch": True}
    assert link.forward_frames_nowait(src, dest, frames, 2) == 2
    assert queued_frames(link) == [wire.ForwardPacket(src=src, dest=dest, payload=p) for p in big]


def test_a_run_that_does_not_fit_the_link_queue_keeps_its_first_packets() -> None:
    link = RelayClient(["ws://127.0.0.1:1/derp"], PrivateKey.generate(), send_queue_packets=2)
    link.server_info = {"forward_batch": True}
    src, dest = bytes(32), bytes(range(32))
    run = [bytes([i]) * 30_000 for i in range(7)]
    # Two packets per frame, two frames fit.
    assert link.forward_run_nowait(src, dest, run) == 4
    assert queued_frames(link) == [
        wire.ForwardPackets(src=src, dest=dest, payloads=tuple(run[0:2])),
        wire.ForwardPackets(src=src, dest=dest, payloads=tuple(run[2:4])),
    ]


async def test_a_slow_steady_receiver_does_not_set_the_pace_of_a_mesh_link(
    nursery: trio.Nursery,
) -> None:
    """W (on eu) blasts Y (on us), and Y reads one message every 0.1 s: its writer keeps
    taking, so its queue is never stuck, only slow. The far relay's reader of the eu->us
    link waits on Y's queue at most one wait per drain, so a bystander X's packets to Z
    (on us) all arrive and none is dropped; Y's own are dropped at Y's queue, counted."""
    n = 3000
    payload = b"x" * 1200
    async with open_memory_store() as store:
        eu = await start_node(nursery, store, "eu", "eu-1")
        us = await start_node(nursery, store, "us", "us-1")
        assert eu.state is not None and eu.mesh is not None
        state, mesh = eu.state, eu.mesh
        y, x, z, w = (PrivateKey.generate() for _ in range(4))
        async with (
            open_websocket_url(us.ws_url, subprotocols=["derp"], disconnect_timeout=0.1) as y_ws,
            open_relay_client(eu.ws_url, w) as attacker,
            open_relay_client(eu.ws_url, x) as sender,
            open_relay_client(us.ws_url, z) as receiver,
        ):
            await client_handshake(y_ws, wire.FrameDecoder(), y)
            with trio.fail_after(10):
                await wait_until(
                    lambda: (
                        state.route(y.public.raw) is not None
                        and state.route(z.public.raw) is not None
                    )
                )
            async with trio.open_nursery() as attack:
                reads = 0

                async def read_slowly() -> None:
                    nonlocal reads
                    while True:
                        await y_ws.get_message()
                        reads += 1
                        await trio.sleep(0.1)

                async def feed() -> None:
                    while True:
                        await attacker.send(y.public, payload)

                attack.start_soon(read_slowly)
                attack.start_soon(feed)
                y_out = us.server._clients[y.public.raw].out
                with trio.fail_after(30):
                    await wait_until(y_out.pressed)
                # The attack runs a while first (Y reads 50 messages, about 5 s): long enough,
                # without the per-drain bound for shared readers, to fill the eu->us link's
                # queue at Y's pace.
                with trio.fail_after(60):
                    await wait_until(lambda: reads >= 50)

                async def bystander() -> None:
                    for i in range(n):
                        await sender.send(z.public, SEQ.pack(i) + payload)

                attack.start_soon(bystander)
                got: list[int] = []
                with trio.fail_after(30):
                    while len(got) < n:
                        got.append(SEQ.unpack_from((await receiver.receive()).payload)[0])
                attack.cancel_scope.cancel()
        assert got == list(range(n))
        assert sender.statistics().dropped_by_relay == 0
        [link] = mesh.statistics()
        assert link.drops == 0
        assert us.server.statistics().flow_gave_up >= 1
