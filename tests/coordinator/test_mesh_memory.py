"""Relays sharing a MemoryStore in one process: registry, peer map, forwarding."""

from __future__ import annotations

import contextlib

import trio

from coordinator.store import open_memory_store
from relay.client import RelayClosedError, open_relay_client
from relay.config import load_config
from relay.node import NodeInfo, serve_relay_node
from relay.protocol.keys import PrivateKey
from tests.conftest import wait_until

MESH_KEY = b"0123456789abcdef0123456789abcdef"


async def start(nursery: trio.Nursery, store, region: str, name: str, **mesh: object) -> NodeInfo:  # type: ignore[no-untyped-def]
    cfg = load_config(
        overrides={
            "relay": {"port": 0, "http_port": 0, "stun_port": 0, "region": region, "name": name},
            "mesh": {"lease_ttl_s": 2, "keepalive_interval_s": 0.5, **mesh},
            # The mesh monitor's probe clients would appear in the peer map.
            "health": {"enabled": False},
        }
    )
    info: NodeInfo = await nursery.start(
        lambda task_status: serve_relay_node(
            cfg, store=store, mesh_key=MESH_KEY, task_status=task_status
        )
    )
    return info


async def test_clients_on_two_relays_talk_through_the_mesh(nursery: trio.Nursery) -> None:
    async with open_memory_store() as store:
        eu = await start(nursery, store, "eu", "eu-1")
        us = await start(nursery, store, "us", "us-1")
        assert eu.state is not None and us.state is not None
        with trio.fail_after(5):
            await wait_until(lambda: len(eu.state.relays) == 2 and len(us.state.relays) == 2)
        a, b = PrivateKey.generate(), PrivateKey.generate()
        async with open_relay_client(eu.ws_url, a) as ca, open_relay_client(us.ws_url, b) as cb:
            with trio.fail_after(5):
                await wait_until(
                    lambda: (
                        eu.state.route(b.public.raw) is not None
                        and us.state.route(a.public.raw) is not None
                    )
                )
            for i in range(100):
                await ca.send(b.public, b"a->b %d" % i)
                await cb.send(a.public, b"b->a %d" % i)
            with trio.fail_after(10):
                got_b = [(await cb.receive()).payload for _ in range(100)]
                got_a = [(await ca.receive()).payload for _ in range(100)]
        assert got_b == [b"a->b %d" % i for i in range(100)]
        assert got_a == [b"b->a %d" % i for i in range(100)]
        assert eu.server.statistics().forwarded_in == 100
        # Clean disconnects delete the records: the peers are GONE, not LOST.
        with trio.fail_after(5):
            await wait_until(lambda: not eu.state.peers and not us.state.peers)


async def test_lost_lease_means_register_again_and_republish(nursery: trio.Nursery) -> None:
    async with open_memory_store() as store:
        eu = await start(nursery, store, "eu", "eu-1")
        assert eu.state is not None
        a = PrivateKey.generate()
        async with open_relay_client(eu.ws_url, a):
            key = f"/relaymesh/v1/peers/{a.public}"
            with trio.fail_after(5):
                await wait_until(lambda: eu.state.registered and not eu.state._dirty)
            assert [kv.key for kv in (await store.get_prefix(key)).items] == [key]
            old = eu.state.lease
            await store.revoke(old)  # as if the store had expired it during an outage
            assert not (await store.get_prefix(key)).items
            with trio.fail_after(5):
                await wait_until(lambda: eu.state.lease != old and not eu.state._dirty)
            snap = await store.get_prefix("/relaymesh/v1/")
            assert {kv.key for kv in snap.items} == {"/relaymesh/v1/relays/eu-1", key}
            assert eu.state.statistics().registrations == 2


async def test_wrong_mesh_key_is_refused_and_counted(nursery: trio.Nursery) -> None:
    async with open_memory_store() as store:
        good = await start(nursery, store, "eu", "eu-1")
        cfg = load_config(
            overrides={
                "relay": {
                    "port": 0,
                    "http_port": 0,
                    "stun_port": 0,
                    "region": "eu",
                    "name": "eu-2",
                },
                "mesh": {"lease_ttl_s": 2, "keepalive_interval_s": 0.5},
            }
        )
        intruder: NodeInfo = await nursery.start(
            lambda task_status: serve_relay_node(
                cfg, store=store, mesh_key=b"not-the-mesh-key-at-all", task_status=task_status
            )
        )
        with trio.fail_after(10):
            await wait_until(lambda: good.server.statistics().closes.get("bad_mesh_key", 0) >= 1)
        closes = good.server.statistics().closes
        assert "unauthorized" not in closes  # one wrong proof is counted once
        assert good.server.statistics().mesh_peers == 0
        assert intruder.mesh is not None and intruder.mesh.region_links_down() == ["eu-1"]


async def test_expired_leases_of_live_relays_cost_no_packets(nursery: trio.Nursery) -> None:
    """What a store outage longer than the lease TTL does: every lease expires at once,
    the relays register again and republish. Packets between them keep flowing."""
    async with open_memory_store() as store:
        eu = await start(nursery, store, "eu", "eu-1")
        us = await start(nursery, store, "us", "us-1")
        assert eu.state is not None and us.state is not None
        a, b = PrivateKey.generate(), PrivateKey.generate()
        async with open_relay_client(eu.ws_url, a) as ca, open_relay_client(us.ws_url, b) as cb:
            with trio.fail_after(5):
                await wait_until(lambda: eu.state.route(b.public.raw) is not None)
            received: list[int] = []
            sent = 0

            async def receive() -> None:
                # Until cb closes: then receive() raises instead of waiting for ever.
                with contextlib.suppress(RelayClosedError):
                    while True:
                        received.append(int((await cb.receive()).payload))

            async def send_for(seconds: float) -> None:
                nonlocal sent
                with trio.move_on_after(seconds):
                    while True:
                        await ca.send(b.public, b"%d" % sent)
                        sent += 1
                        await trio.sleep(0.002)

            nursery.start_soon(receive)
            await send_for(0.2)
            await store.revoke(eu.state.lease)
            await store.revoke(us.state.lease)
            with trio.fail_after(5):
                await wait_until(lambda: eu.state.route(b.public.raw) is None)  # b is LOST
            await send_for(0.2)
            with trio.fail_after(5):
                await wait_until(lambda: eu.state.route(b.public.raw) is not None)
            await send_for(0.2)
            with trio.move_on_after(5):
                await wait_until(lambda: len(received) >= sent)
        assert eu.state.statistics().registrations == 2
        assert us.state.statistics().registrations == 2
        missing = sorted(set(range(sent)) - set(received))
        assert missing == [], f"{len(missing)} of {sent} lost"
        assert received == list(range(sent))
        assert eu.server.statistics().drops["unknown_dest"] == 0


async def test_a_planned_stop_is_remembered_as_a_departure(nursery: trio.Nursery) -> None:
    from coordinator.registry import RelayRecord
    from coordinator.state import MeshState

    def record(name: str) -> RelayRecord:
        return RelayRecord(
            relay_id=name,
            region=name.split("-")[0],
            name=name,
            ws_url=f"ws://{name}/derp",
            http_url=f"http://{name}",
            public_key=str(PrivateKey.generate().public),
            started_at=1.0,
            version="test",
        )

    async with open_memory_store() as store:

        async def run(name: str) -> tuple[MeshState, trio.CancelScope]:
            state = MeshState(store, record(name), lease_ttl_s=2, keepalive_interval_s=0.5)
            scope = trio.CancelScope()

            async def serve(*, task_status: trio.TaskStatus[None]) -> None:
                with scope:
                    await state.run(task_status=task_status)

            await nursery.start(serve)
            with trio.fail_after(5):
                await state.wait_registered()
            return state, scope

        async def stop(state: MeshState, scope: trio.CancelScope) -> None:
            scope.cancel()  # first, or its keepalive would register it again
            await store.revoke(state.lease)

        seen, _ = await run("eu-1")
        planned, planned_scope = await run("us-1")
        crashed, crashed_scope = await run("us-2")
        with trio.fail_after(5):
            await wait_until(lambda: len(seen.relays) == 3)

        assert await planned.announce_leaving() is True
        with trio.fail_after(5):
            await wait_until(lambda: seen.relays["us-1"].leaving_at is not None)
        await stop(planned, planned_scope)
        await stop(crashed, crashed_scope)
        with trio.fail_after(5):
            await wait_until(lambda: set(seen.relays) == {"eu-1"})
        assert list(seen.departed) == ["us-1"]
        assert seen.departed["us-1"].leaving_at == planned.me.leaving_at

        # Back under the same name: no longer a departure.
        await run("us-1")
        with trio.fail_after(5):
            await wait_until(lambda: "us-1" in seen.relays)
        assert not seen.departed
