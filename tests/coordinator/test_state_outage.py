"""MeshState across a store outage: back in use at once, and the peer map kept whole.

A FlakyStore is a MemoryStore that can be made unreachable: every call fails
and open watches break, as when etcd is killed. Time is virtual (autojump),
so the figures are exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from coordinator.peermap import PeerRecord, PeerState
from coordinator.registry import RelayRecord
from coordinator.state import MeshState
from coordinator.store import (
    MemoryStore,
    Snapshot,
    StoreUnavailable,
    WatchBatch,
    WatchBroken,
    open_memory_store,
)
from relay.protocol.keys import PrivateKey
from tests.conftest import wait_until

PREFIX = "/relaymesh/v1/"


def relay(relay_id: str) -> RelayRecord:
    return RelayRecord(
        relay_id=relay_id,
        region="eu",
        name=relay_id,
        ws_url=f"ws://{relay_id}/derp",
        http_url=f"http://{relay_id}",
        public_key=str(PrivateKey.generate().public),
        started_at=0.0,
        version="test",
    )


class FlakyStore:
    """MemoryStore behind a switch: while down, every call fails and open watches break."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.down = False
        self.failed_reads = 0
        self._watches: list[trio.MemorySendChannel[WatchBatch]] = []

    def go_down(self) -> None:
        self.down = True
        for send in self._watches:
            send.send_nowait(WatchBroken("store went down"))
            send.close()
        self._watches.clear()

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("the store is down")

    async def get_prefix(self, prefix: str) -> Snapshot:
        await trio.lowlevel.checkpoint()
        if self.down:
            self.failed_reads += 1
        self._check()
        return await self.inner.get_prefix(prefix)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self._check()
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str, *, if_value: bytes | None = None) -> bool:
        self._check()
        return await self.inner.delete(key, if_value=if_value)

    async def grant_lease(self, ttl_s: int) -> int:
        self._check()
        return await self.inner.grant_lease(ttl_s)

    async def keepalive(self, lease: int) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        await self.inner.keepalive(lease)

    async def revoke(self, lease: int) -> None:
        self._check()
        await self.inner.revoke(lease)

    @asynccontextmanager
    async def watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[trio.MemoryReceiveChannel[WatchBatch]]:
        self._check()
        send, receive = trio.open_memory_channel[WatchBatch](1024)
        self._watches.append(send)

        async def pump(rx: trio.MemoryReceiveChannel[WatchBatch]) -> None:
            async for batch in rx:
                try:
                    send.send_nowait(batch)
                except trio.ClosedResourceError:
                    return

        async with self.inner.watch(prefix, start_revision) as rx, trio.open_nursery() as nursery:
            nursery.start_soon(pump, rx)
            try:
                yield receive
            finally:
                nursery.cancel_scope.cancel()
                if send in self._watches:
                    self._watches.remove(send)


def ready(state: MeshState) -> bool:
    """What /readyz asks of the shared state."""
    return state.registered and state.synced and state.degraded is None


async def test_a_store_that_comes_back_is_in_use_again_within_a_second(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with open_memory_store() as mem:
        store = FlakyStore(mem)
        state = MeshState(store, relay("me"), lease_ttl_s=8, keepalive_interval_s=2)
        await nursery.start(state.run)
        with trio.fail_after(10):
            await wait_until(lambda: ready(state))
        store.go_down()
        down_at = trio.current_time()
        # Long enough for every retry backoff to reach its longest wait.
        with trio.fail_after(60):
            await wait_until(lambda: store.failed_reads >= 8)
        assert not ready(state)
        store.down = False
        back = trio.current_time()
        with trio.fail_after(30):
            await wait_until(lambda: ready(state))
        recovery_s = trio.current_time() - back
        print(f"\nFIGURE store down {back - down_at:.1f} s: ready {recovery_s * 1000:.0f} ms after")
        assert recovery_s < 1.0


async def test_resync_keeps_a_reregistered_relays_peers_lost_and_forgets_gone_ones(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with open_memory_store() as mem:
        store = FlakyStore(mem)
        state = MeshState(store, relay("me"), lease_ttl_s=8, keepalive_interval_s=2)
        await nursery.start(state.run)
        lost, gone = PrivateKey.generate().public, PrivateKey.generate().public
        old_lease, steady_lease = await mem.grant_lease(8), await mem.grant_lease(3600)
        for relay_id, key, lease in (("other", lost, old_lease), ("steady", gone, steady_lease)):
            await mem.put(f"{PREFIX}relays/{relay_id}", relay(relay_id).to_json(), lease=lease)
            record = PeerRecord(relay_id=relay_id, region="eu", since=0.0)
            await mem.put(f"{PREFIX}peers/{key}", record.to_json(), lease=lease)
        with trio.fail_after(10):
            await wait_until(lambda: state.route(lost.raw) and state.route(gone.raw))
        store.go_down()
        # Unseen by us: `gone` says goodbye to steady; other's lease expires (taking
        # `lost`'s record) and other registers again, not yet republishing `lost`.
        await mem.delete(f"{PREFIX}peers/{gone}")
        await mem.revoke(old_lease)
        await mem.put(
            f"{PREFIX}relays/other", relay("other").to_json(), lease=await mem.grant_lease(8)
        )
        store.down = False
        with trio.fail_after(30):
            await wait_until(lambda: state.synced and state.revision == mem.revision)
        assert state.route(lost.raw) is None
        assert state.peers[lost.raw].state is PeerState.LOST
        assert state.last_relay(lost.raw) == "other"
        assert gone.raw not in state.peers
