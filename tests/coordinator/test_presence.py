"""PresenceQueue: per-key coalescing, latest wins, nothing lost while a change is applied."""

from __future__ import annotations

import trio
import trio.testing

from coordinator.presence import Presence, PresenceQueue
from relay.protocol.handshake import ClientHello
from relay.protocol.keys import NodeKey, PrivateKey


def hello(key: NodeKey) -> ClientHello:
    return ClientHello(client_key=key, version=2, token=None, mesh_proof=None, preferred=False)


def up(key: NodeKey) -> Presence:
    return Presence(key=key, hello=hello(key))


def down(key: NodeKey) -> Presence:
    return Presence(key=key, hello=None)


async def test_changes_coalesce_per_key_and_the_latest_wins() -> None:
    q = PresenceQueue()
    a, b = PrivateKey.generate().public, PrivateKey.generate().public
    for _ in range(1000):
        q.put_nowait(up(a))
        q.put_nowait(down(a))
    q.put_nowait(up(b))
    stats = q.statistics()
    assert stats.pending == 2 and stats.high_water == 2
    assert stats.changes == 2001 and stats.coalesced == 1999
    first = await q.get()
    assert first.key == a and not first.connected
    q.done(first)
    second = await q.get()
    assert second.key == b and second.connected
    q.done(second)
    assert q.statistics().pending == 0


async def test_a_change_reported_while_another_is_applied_is_not_lost() -> None:
    q = PresenceQueue()
    a = PrivateKey.generate().public
    q.put_nowait(up(a))
    taken = await q.get()
    q.put_nowait(down(a))  # the client left while its connect was being published
    q.done(taken)
    left = await q.get()
    assert left.key == a and not left.connected


async def test_a_deferred_change_lets_the_others_through() -> None:
    q = PresenceQueue()
    a, b = PrivateKey.generate().public, PrivateKey.generate().public
    q.put_nowait(up(a))
    q.put_nowait(up(b))
    poison = await q.get()
    q.defer(poison)
    other = await q.get()
    assert other.key == b
    q.done(other)
    assert (await q.get()) is poison


async def test_get_waits_for_a_change(autojump_clock: trio.testing.MockClock) -> None:
    q = PresenceQueue()
    a = PrivateKey.generate().public
    got: list[Presence] = []

    async def consumer() -> None:
        got.append(await q.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.sleep(1)
        assert got == []
        q.put_nowait(up(a))
    assert got[0].key == a
