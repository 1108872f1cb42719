"""A relay that dies without a goodbye: its lease expires, its peers go LOST, then are forgotten.

Two MeshStates share a MemoryStore. Time is virtual (autojump): the lease TTL
and the LOST grace period are waited out exactly, and take no real seconds.
"""

from __future__ import annotations

import trio
import trio.testing

from coordinator.peermap import PeerState
from coordinator.state import MeshState
from coordinator.store import MemoryStore, open_memory_store
from relay.protocol.keys import PrivateKey
from tests.conftest import wait_until
from tests.coordinator.test_state_outage import relay

TTL_S = 2
KEEPALIVE_S = 0.5
GRACE_S = 30.0


def state(store: MemoryStore, relay_id: str) -> MeshState:
    return MeshState(
        store,
        relay(relay_id),
        lease_ttl_s=TTL_S,
        keepalive_interval_s=KEEPALIVE_S,
        lost_grace_s=GRACE_S,
    )


async def test_a_dead_relays_peers_are_lost_at_lease_expiry_then_forgotten(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    async with open_memory_store() as store:
        eu, us = state(store, "eu-1"), state(store, "us-1")
        await nursery.start(eu.run)
        us_scope = trio.CancelScope()

        async def run_us(*, task_status: trio.TaskStatus[None]) -> None:
            with us_scope:
                await us.run(task_status=task_status)

        await nursery.start(run_us)
        b = PrivateKey.generate().public
        us.client_connected(b)
        with trio.fail_after(10):
            await wait_until(lambda: eu.route(b.raw) is not None)
        # us-1 dies: no goodbye, its keepalives just stop.
        us_scope.cancel()
        died = trio.current_time()
        with trio.fail_after(10):
            await wait_until(lambda: "us-1" not in eu.relays)
        entry = eu.peers[b.raw]
        assert entry.state is PeerState.LOST
        # The lease was last kept alive at most one keepalive interval before it died.
        assert TTL_S - KEEPALIVE_S - 1e-6 <= entry.lost_at - died <= TTL_S + 1e-6
        assert eu.route(b.raw) is None
        assert eu.last_relay(b.raw) == "us-1"
        with trio.fail_after(2 * GRACE_S):
            await wait_until(lambda: b.raw not in eu.peers, 0.1)
        # Forgotten once the grace period is over, at the next check (every 1 s).
        assert GRACE_S - 1e-6 <= trio.current_time() - entry.lost_at <= GRACE_S + 1.11
