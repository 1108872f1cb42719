"""The Store contract, run against MemoryStore and a real etcd alike."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from coordinator.etcd import open_etcd_store
from coordinator.store import (
    EventKind,
    LeaseNotFound,
    Store,
    WatchBatch,
    WatchEvent,
    open_memory_store,
)
from tests.etcd_cluster import EtcdCluster


@pytest.fixture(params=["memory", "etcd"])
def store_factory(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    if request.param == "memory":
        return lambda: open_memory_store()
    cluster: EtcdCluster = request.getfixturevalue("etcd")
    return lambda: open_etcd_store(cluster.endpoints)


@pytest.fixture
def store_clock(request: pytest.FixtureRequest) -> trio.testing.MockClock | None:
    """Virtual time (autojump) where the store keeps time with trio's clock: MemoryStore.

    A real etcd keeps its own time, and its calls run in threads that the
    autojump clock would not wait for, so it gets the real clock.
    """
    if request.node.callspec.params["store_factory"] == "memory":
        return trio.testing.MockClock(autojump_threshold=0)
    return None


@pytest.fixture
def prefix() -> str:
    return f"/test/{uuid.uuid4().hex[:8]}/"


@asynccontextmanager
async def opened(factory) -> AsyncIterator[Store]:  # type: ignore[no-untyped-def]
    async with factory() as store:
        yield store


async def next_events(rx: trio.MemoryReceiveChannel[WatchBatch], n: int) -> list[WatchEvent]:
    got: list[WatchEvent] = []
    with trio.fail_after(10):
        while len(got) < n:
            batch = await rx.receive()
            assert isinstance(batch, list), batch
            got.extend(batch)
    return got


async def test_put_get_delete_revisions(store_factory, prefix: str) -> None:  # type: ignore[no-untyped-def]
    async with opened(store_factory) as store:
        r1 = await store.put(prefix + "a", b"1")
        r2 = await store.put(prefix + "b", b"2")
        assert r2 > r1
        snap = await store.get_prefix(prefix)
        assert [(kv.key, kv.value) for kv in snap.items] == [
            (prefix + "a", b"1"),
            (prefix + "b", b"2"),
        ]
        assert snap.revision >= r2
        assert await store.delete(prefix + "a")
        assert not await store.delete(prefix + "a")
        assert [kv.key for kv in (await store.get_prefix(prefix)).items] == [prefix + "b"]


async def test_conditional_delete(store_factory, prefix: str) -> None:  # type: ignore[no-untyped-def]
    async with opened(store_factory) as store:
        await store.put(prefix + "peer", b"relay-b")
        assert not await store.delete(prefix + "peer", if_value=b"relay-a")
        assert (await store.get_prefix(prefix)).items[0].value == b"relay-b"
        assert await store.delete(prefix + "peer", if_value=b"relay-b")


async def test_snapshot_then_watch_loses_nothing(store_factory, prefix: str) -> None:  # type: ignore[no-untyped-def]
    async with opened(store_factory) as store:
        await store.put(prefix + "x", b"0")
        snap = await store.get_prefix(prefix)
        # Changes made after the snapshot but before the watch exists.
        await store.put(prefix + "x", b"1")
        await store.put(prefix + "y", b"2")
        await store.delete(prefix + "y")
        async with store.watch(prefix, snap.revision + 1) as rx:
            await store.put(prefix + "z", b"3")
            events = await next_events(rx, 4)
    assert [(e.kind, e.key[len(prefix) :], e.value) for e in events] == [
        (EventKind.PUT, "x", b"1"),
        (EventKind.PUT, "y", b"2"),
        (EventKind.DELETE, "y", b""),
        (EventKind.PUT, "z", b"3"),
    ]
    revs = [e.revision for e in events]
    assert revs == sorted(revs) and revs[0] > snap.revision


async def test_watch_sees_only_its_prefix(store_factory, prefix: str) -> None:  # type: ignore[no-untyped-def]
    async with opened(store_factory) as store:
        snap = await store.get_prefix(prefix)
        async with store.watch(prefix + "in/", snap.revision + 1) as rx:
            await store.put(prefix + "out/1", b"no")
            await store.put(prefix + "in/1", b"yes")
            events = await next_events(rx, 1)
    assert [e.key for e in events] == [prefix + "in/1"]


async def test_lease_keys_vanish_together_on_revoke(store_factory, prefix: str) -> None:  # type: ignore[no-untyped-def]
    async with opened(store_factory) as store:
        lease = await store.grant_lease(10)
        await store.put(prefix + "relay", b"r", lease=lease)
        await store.put(prefix + "peer1", b"p", lease=lease)
        await store.put(prefix + "other", b"o")
        await store.keepalive(lease)
        snap = await store.get_prefix(prefix)
        async with store.watch(prefix, snap.revision + 1) as rx:
            await store.revoke(lease)
            events = await next_events(rx, 2)
        assert {e.key for e in events} == {prefix + "relay", prefix + "peer1"}
        assert all(e.kind is EventKind.DELETE for e in events)
        assert len({e.revision for e in events}) == 1  # one revision: they go together
        assert [kv.key for kv in (await store.get_prefix(prefix)).items] == [prefix + "other"]
        with pytest.raises(LeaseNotFound):
            await store.keepalive(lease)
        with pytest.raises(LeaseNotFound):
            await store.put(prefix + "late", b"x", lease=lease)


async def test_lease_expires_without_keepalive(store_factory, prefix: str, store_clock) -> None:  # type: ignore[no-untyped-def]
    async with opened(store_factory) as store:
        lease = await store.grant_lease(1)
        await store.put(prefix + "k", b"v", lease=lease)
        granted = trio.current_time()
        with trio.fail_after(10):
            while (await store.get_prefix(prefix)).items:  # noqa: ASYNC110 - polls the store
                await trio.sleep(0.1)
        if store_clock is not None:
            # Virtual time is exact: not before the TTL, and within one poll after it.
            assert 1.0 <= trio.current_time() - granted <= 1.1
        with pytest.raises(LeaseNotFound):
            await store.keepalive(lease)


async def test_memory_store_watch_from_compacted_revision() -> None:
    from coordinator.store import Compacted

    async with open_memory_store(history=4) as store:
        for i in range(10):
            await store.put(f"/k{i}", b"v")
        with pytest.raises(Compacted):
            async with store.watch("/", 2):
                pass


async def test_memory_store_slow_watcher_is_ended_not_blocking() -> None:
    async with (
        open_memory_store(watch_buffer=2) as store,
        store.watch("/", store.revision + 1) as rx,
    ):
        for i in range(5):
            await store.put(f"/k{i}", b"v")  # never blocks the writer
        got = [await rx.receive(), await rx.receive()]
        assert all(isinstance(b, list) for b in got)
        with pytest.raises(trio.EndOfChannel):
            await rx.receive()
