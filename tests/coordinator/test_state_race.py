"""Updates made while a relay starts (between its snapshot and its watch) are not lost."""

from __future__ import annotations

import random
import uuid

import pytest
import trio
import trio.testing

from coordinator.etcd import open_etcd_store
from coordinator.peermap import PeerRecord
from coordinator.registry import RelayRecord
from coordinator.state import MeshState
from coordinator.store import Store, open_memory_store
from relay.protocol.keys import NodeKey, PrivateKey
from tests.conftest import wait_until
from tests.etcd_cluster import EtcdCluster


def me() -> RelayRecord:
    return RelayRecord(
        relay_id="watcher",
        region="eu",
        name="watcher",
        ws_url="ws://x/derp",
        http_url="http://x",
        public_key=str(PrivateKey.generate().public),
        started_at=0.0,
        version="test",
    )


async def churn(store: Store, prefix: str, n: int, started: trio.Event) -> None:
    """Another relay's clients coming and going, as fast as the store takes it."""
    rng = random.Random(7)
    keys = [str(PrivateKey.generate().public) for _ in range(40)]
    other = RelayRecord(
        relay_id="other",
        region="us",
        name="other",
        ws_url="ws://o/derp",
        http_url="http://o",
        public_key=keys[0],
        started_at=0.0,
        version="t",
    )
    await store.put(f"{prefix}relays/other", other.to_json())
    for i in range(n):
        key = rng.choice(keys)
        if rng.random() < 0.3:
            await store.delete(f"{prefix}peers/{key}")
        else:
            record = PeerRecord(relay_id="other", region="us", since=float(i))
            await store.put(f"{prefix}peers/{key}", record.to_json())
        if i == n // 3:
            started.set()


async def check_no_update_lost(store: Store, prefix: str) -> None:
    state = MeshState(store, me(), prefix=prefix, lease_ttl_s=5, keepalive_interval_s=1)
    async with trio.open_nursery() as nursery:
        started = trio.Event()
        done = trio.Event()

        async def churn_then_done() -> None:
            await churn(store, prefix, 300, started)
            done.set()

        nursery.start_soon(churn_then_done)
        await started.wait()
        await nursery.start(state.run)  # snapshot and watch while the churn goes on
        await done.wait()

        async def caught_up() -> bool:
            snap = await store.get_prefix(prefix + "peers/")
            return state.revision >= snap.revision

        with trio.fail_after(10):
            while not await caught_up():  # noqa: ASYNC110 - polls the store
                await trio.sleep(0.05)
        snap = await store.get_prefix(prefix + "peers/")
        want = {kv.key.rsplit("/", 1)[1]: PeerRecord.from_json(kv.value) for kv in snap.items}
        got = {str(NodeKey(raw)): entry.record for raw, entry in state.peers.items()}
        assert got == want
        assert len(want) > 5
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("round_", range(3))
async def test_race_memory_store(round_: int, autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_store() as store:
        await check_no_update_lost(store, f"/race{round_}/")


@pytest.mark.parametrize("round_", range(2))
async def test_race_etcd(etcd: EtcdCluster, round_: int) -> None:
    async with open_etcd_store(etcd.endpoints) as store:
        await check_no_update_lost(store, f"/race-{uuid.uuid4().hex[:6]}/")


async def test_cache_converges_after_its_watch_breaks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A broken watch (overflow, lost connection) means: snapshot again, watch again."""
    async with open_memory_store() as store:
        state = MeshState(store, me(), prefix="/brk/", lease_ttl_s=5, keepalive_interval_s=1)
        async with trio.open_nursery() as nursery:
            await nursery.start(state.run)
            with trio.fail_after(5):
                await wait_until(lambda: state.synced)
            keys = [str(PrivateKey.generate().public) for _ in range(20)]
            # Cut the watch off, as the store does to a watcher that falls behind,
            # and change things before the relay can watch again.
            for watcher in list(store._watchers):
                watcher.send.close()
                store._watchers.remove(watcher)
            for i, key in enumerate(keys):
                await store.put(
                    f"/brk/peers/{key}",
                    PeerRecord(relay_id="x", region="r", since=float(i)).to_json(),
                )
            with trio.fail_after(5):
                await wait_until(lambda: len(state.peers) == 20)
            assert state.statistics().resyncs >= 1
            nursery.cancel_scope.cancel()
