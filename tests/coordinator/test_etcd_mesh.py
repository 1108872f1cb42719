"""Relays as separate processes sharing a real etcd: the HA behaviour operators rely on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from relay.client import RelayClient, open_relay_client
from relay.protocol.keys import NodeKey, PrivateKey
from tests.conftest import wait_until
from tests.etcd_cluster import EtcdCluster, start_cluster
from tests.relay_procs import RelayProc, start_relay_proc

pytestmark = pytest.mark.slow


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = start_cluster(tmp_path / "etcd")
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def relays() -> Iterator[list[RelayProc]]:
    started: list[RelayProc] = []
    try:
        yield started
    finally:
        for r in started:
            r.stop()


async def exchange(a: RelayClient, b: RelayClient, n: int = 20, tag: bytes = b"") -> None:
    """a → b and b → a, n numbered packets each way, all must arrive in order."""
    for i in range(n):
        await a.send(b.public_key, tag + b"ab%d" % i)
        await b.send(a.public_key, tag + b"ba%d" % i)
    with trio.fail_after(10):
        assert [(await b.receive()).payload for _ in range(n)] == [
            tag + b"ab%d" % i for i in range(n)
        ]
        assert [(await a.receive()).payload for _ in range(n)] == [
            tag + b"ba%d" % i for i in range(n)
        ]


async def wait_routed(relay: RelayProc, *keys: NodeKey, within_s: float = 10) -> None:
    def known() -> bool:
        return relay.status()["shared_state"]["peers_present"] >= len(keys)

    with trio.fail_after(within_s):
        await wait_until(known, 0.05)


async def test_two_regions_exchange_and_peer_map_is_in_etcd(
    etcd: EtcdCluster, relays: list[RelayProc], tmp_path: Path
) -> None:
    eu = start_relay_proc(tmp_path, etcd.endpoints, "eu", "eu-1")
    us = start_relay_proc(tmp_path, etcd.endpoints, "us", "us-1")
    relays += [eu, us]
    a, b = PrivateKey.generate(), PrivateKey.generate()
    async with open_relay_client(eu.ws_url, a) as ca, open_relay_client(us.ws_url, b) as cb:
        await wait_routed(eu, a.public, b.public)
        await wait_routed(us, a.public, b.public)
        await exchange(ca, cb, 200)
        listing = etcd.etcdctl("get", "--prefix", "/relaymesh/v1/peers/")
        lines = listing.splitlines()
        records = {lines[i]: json.loads(lines[i + 1]) for i in range(0, len(lines), 2)}
        assert records[f"/relaymesh/v1/peers/{a.public}"]["relay_id"] == "eu-1"
        assert records[f"/relaymesh/v1/peers/{b.public}"]["relay_id"] == "us-1"
        assert records[f"/relaymesh/v1/peers/{b.public}"]["region"] == "us"
    assert eu.status()["stats"]["forwarded_in"] == 200
    assert us.status()["stats"]["forwarded_in"] == 200


async def test_kill_9_relay_peers_lost_clients_fail_over(
    etcd: EtcdCluster, relays: list[RelayProc], tmp_path: Path
) -> None:
    eu = start_relay_proc(tmp_path, etcd.endpoints, "eu", "eu-1")
    us1 = start_relay_proc(tmp_path, etcd.endpoints, "us", "us-1")
    us2 = start_relay_proc(tmp_path, etcd.endpoints, "us", "us-2")
    relays += [eu, us1, us2]
    a, b, stuck = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    async with (
        open_relay_client(eu.ws_url, a) as ca,
        open_relay_client([us1.ws_url, us2.ws_url], b, backoff_initial_s=0.05) as cb,
        # A client that only knows us-1: after the kill it cannot come back.
        open_relay_client(us1.ws_url, stuck, backoff_initial_s=0.05),
    ):
        await wait_routed(eu, a.public, b.public, stuck.public)
        await exchange(ca, cb, 10, b"before")
        us1.kill9()
        # b fails over to us-2 and re-registers; traffic from eu follows the peer map.
        with trio.fail_after(10):
            await wait_until(lambda: cb.connected and cb.url == us2.ws_url)

        def lost() -> bool:
            st = eu.status()["shared_state"]
            return st["peers_lost"] == 1 and "us-1" not in eu.status()["relays"]

        with trio.fail_after(15):
            await wait_until(lost, 0.1)
        await exchange(ca, cb, 10, b"after")
    assert eu.ready()[0] == 200


async def test_cluster_loses_one_member_nothing_visible_breaks(
    tmp_path: Path, relays: list[RelayProc]
) -> None:
    cluster = start_cluster(tmp_path / "etcd3", size=3)
    try:
        eu = start_relay_proc(tmp_path, cluster.endpoints, "eu", "eu-1")
        us = start_relay_proc(tmp_path, cluster.endpoints, "us", "us-1")
        relays += [eu, us]
        a, b = PrivateKey.generate(), PrivateKey.generate()
        async with open_relay_client(eu.ws_url, a) as ca, open_relay_client(us.ws_url, b) as cb:
            await wait_routed(us, a.public, b.public)
            await exchange(ca, cb, 10, b"3 members")
            cluster.stop(cluster.members[0], kill=True)
            await exchange(ca, cb, 10, b"2 members")
            # New registrations still reach everyone through the surviving quorum.
            c = PrivateKey.generate()
            async with open_relay_client(us.ws_url, c) as cc:
                await wait_routed(eu, a.public, b.public, c.public, within_s=15)
                await exchange(ca, cc, 10, b"new peer")
            with trio.fail_after(15):
                await wait_until(lambda: eu.ready()[0] == 200 and us.ready()[0] == 200, 0.1)
    finally:
        cluster.stop_all()


async def test_etcd_down_known_routes_keep_working_then_recovery(
    own_etcd: EtcdCluster, relays: list[RelayProc], tmp_path: Path
) -> None:
    eu = start_relay_proc(tmp_path, own_etcd.endpoints, "eu", "eu-1")
    us = start_relay_proc(tmp_path, own_etcd.endpoints, "us", "us-1")
    relays += [eu, us]
    a, b = PrivateKey.generate(), PrivateKey.generate()
    async with open_relay_client(eu.ws_url, a) as ca, open_relay_client(us.ws_url, b) as cb:
        await wait_routed(eu, a.public, b.public)
        await wait_routed(us, a.public, b.public)
        member = own_etcd.members[0]
        own_etcd.stop(member, kill=True)

        def degraded() -> bool:
            code, body = eu.ready()
            return code == 503 and any("unreachable" in p for p in body["problems"])

        with trio.fail_after(15):
            await wait_until(degraded, 0.1)
        # Longer than the lease TTL: the shared state is gone, forwarding is not.
        await trio.sleep(3)
        await exchange(ca, cb, 50, b"etcd down")
        with trio.fail_after(5):
            await wait_until(lambda: ca.health != "", 0.05)
        own_etcd.start(member)
        own_etcd.wait_healthy(member)
        with trio.fail_after(20):
            await wait_until(lambda: eu.ready()[0] == 200 and us.ready()[0] == 200, 0.1)
        # etcd keeps leases across its own restart and renews them; either way the
        # records are there again (re-registration after a lost lease is tested in
        # test_mesh_memory.py).
        listing = own_etcd.etcdctl("get", "--prefix", "/relaymesh/v1/", "--keys-only")
        assert f"/relaymesh/v1/peers/{a.public}" in listing
        assert f"/relaymesh/v1/peers/{b.public}" in listing
        await exchange(ca, cb, 20, b"recovered")
        with trio.fail_after(5):
            await wait_until(lambda: ca.health == "", 0.05)
