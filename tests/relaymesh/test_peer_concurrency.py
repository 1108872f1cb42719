"""open_peer under many concurrent callers, and finding a peer without the peer API."""

from __future__ import annotations

import struct
from collections import defaultdict

import httpx
import pytest
import trio
import trio.testing

from coordinator.store import open_memory_store
from relay.client import RelayClosedError
from relay.protocol.keys import PrivateKey
from relaymesh.peer import PeerNotFound, open_peer
from tests.region.test_live import mesh

SEQ = struct.Struct(">II")


async def test_fifty_tasks_send_through_one_peer_on_a_queue_of_one(nursery: trio.Nursery) -> None:
    """User sends and disco pings share one relay client whose queue holds one packet.

    Relayed only (a's direct paths off): a direct UDP path may lose datagrams
    under a flood, and this test counts every packet.
    """
    async with open_memory_store() as store:
        infos = await mesh(nursery, store, [("eu", "eu-1")])
        url = infos[0].http_url
        a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
        senders, each = 50, 10
        async with (
            open_peer(url, a_key, send_queue_packets=1, direct=False) as a,
            open_peer(url, b_key) as b,
        ):
            got: dict[int, set[int]] = defaultdict(set)
            rtts: list[float] = []

            async def pinger() -> None:
                for _ in range(10):
                    rtts.append((await a.ping(b_key.public))[0])

            async def sender(i: int) -> None:
                for n in range(each):
                    await a.send(b_key.public, SEQ.pack(i, n))

            async def drain() -> None:
                for _ in range(senders * each):
                    i, n = SEQ.unpack((await b.receive()).payload)
                    got[i].add(n)

            with trio.fail_after(20):
                async with trio.open_nursery() as inner:
                    inner.start_soon(drain)
                    inner.start_soon(pinger)
                    for i in range(senders):
                        inner.start_soon(sender, i)
            assert got == {i: set(range(each)) for i in range(senders)}
            assert len(rtts) == 10


async def test_many_pings_at_once_find_the_peer_through_the_relay_alone(
    nursery: trio.Nursery,
) -> None:
    """The peer API refuses clients; twenty concurrent pings still learn b's disco key."""
    async with open_memory_store() as store:
        infos = await mesh(nursery, store, [("eu", "eu-1")])
        url = infos[0].http_url
        a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
        async with open_peer(url, a_key) as a, open_peer(url, b_key) as b:
            async with httpx.AsyncClient() as http:
                resp = await http.get(f"{url}/api/v1/peers/{b_key.public}")
            assert resp.status_code == 401
            rtts: list[float] = []

            async def pinger() -> None:
                rtts.append((await a.ping(b_key.public))[0])

            with trio.fail_after(10):
                async with trio.open_nursery() as inner:
                    for _ in range(20):
                        inner.start_soon(pinger)
            assert len(rtts) == 20 and all(r > 0 for r in rtts)
            # b learnt a's disco key from a's Intro, and pings back through the relay.
            with trio.fail_after(10):
                rtt, info = await b.ping(a_key.public)
            assert rtt > 0 and info.relay == "eu-1"


async def test_ping_to_a_node_nobody_holds_raises_peer_not_found(nursery: trio.Nursery) -> None:
    async with open_memory_store() as store:
        infos = await mesh(nursery, store, [("eu", "eu-1")])
        async with open_peer(infos[0].http_url, PrivateKey.generate()) as a:
            a._intro_tries = 2
            with trio.fail_after(5), pytest.raises(PeerNotFound):
                await a.ping(PrivateKey.generate().public)


async def test_receivers_in_other_tasks_raise_when_the_peer_closes(nursery: trio.Nursery) -> None:
    async with open_memory_store() as store:
        infos = await mesh(nursery, store, [("eu", "eu-1")])
        outcomes: list[str] = []

        async def receiver(peer: object, *, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            try:
                await peer.receive()  # type: ignore[attr-defined]
            except RelayClosedError:
                outcomes.append("closed")

        with trio.fail_after(10):
            async with (
                trio.open_nursery() as others,
                open_peer(infos[0].http_url, PrivateKey.generate()) as a,
            ):
                for _ in range(10):
                    await others.start(receiver, a)
                await trio.testing.wait_all_tasks_blocked()
        assert outcomes == ["closed"] * 10
