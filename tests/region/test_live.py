"""/regionmap, netcheck and open_home_relay against real relays on loopback."""

from __future__ import annotations

from pathlib import Path

import httpx
import nacl.signing
import pytest
import trio

from coordinator.store import open_memory_store
from region.model import RegionMap
from region.netcheck import run_netcheck
from relay.client import open_relay_client
from relay.config import load_config
from relay.node import NodeInfo, serve_relay_node
from relay.protocol.keys import PrivateKey
from relaymesh.home import MapFetchError, RegionMapSource, open_home_relay
from tests.conftest import wait_until

MESH_KEY = b"0123456789abcdef0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]


async def mesh(
    nursery: trio.Nursery, store: object, names: list[tuple[str, str]], **region_map: object
) -> list[NodeInfo]:
    infos = []
    for region, name in names:
        cfg = load_config(
            overrides={
                "relay": {
                    "port": 0,
                    "http_port": 0,
                    "stun_port": 0,
                    "region": region,
                    "name": name,
                },
                "mesh": {"lease_ttl_s": 2, "keepalive_interval_s": 0.5},
                "region_map": dict(region_map),
            }
        )
        infos.append(
            await nursery.start(
                lambda task_status, cfg=cfg: serve_relay_node(
                    cfg, store=store, mesh_key=MESH_KEY, task_status=task_status
                )
            )
        )
    for info in infos:
        assert info.state is not None
        with trio.fail_after(5):
            await wait_until(lambda info=info: len(info.state.relays) == len(names))
    return infos


async def test_regionmap_etag_cache_and_signature(nursery: trio.Nursery, tmp_path: Path) -> None:
    signing = nacl.signing.SigningKey.generate()
    key_file = tmp_path / "map.key"
    key_file.write_text(bytes(signing).hex())
    async with open_memory_store() as store:
        infos = await mesh(
            nursery, store, [("eu", "eu-1"), ("us", "us-1")], signing_key_file=str(key_file)
        )
        url = infos[0].http_url + "/regionmap"
        async with httpx.AsyncClient() as http:
            r = await http.get(url)
            assert r.status_code == 200 and r.headers["Cache-Control"].startswith("public")
            doc = RegionMap.model_validate_json(r.content)
            assert [reg.code for reg in doc.regions] == ["eu", "us"]
            again = await http.get(url, headers={"If-None-Match": r.headers["ETag"]})
            assert again.status_code == 304 and again.content == b""
        good = RegionMapSource(infos[1].http_url, verify_key=signing.verify_key)
        assert (await good.fetch()).node("us-1") is not None
        bad = RegionMapSource(
            infos[1].http_url, verify_key=nacl.signing.SigningKey.generate().verify_key
        )
        with pytest.raises(MapFetchError, match="signature does not verify"):
            await bad.fetch()


async def test_configured_map_marks_missing_relays_down(nursery: trio.Nursery) -> None:
    async with open_memory_store() as store:
        infos = await mesh(
            nursery, store, [("eu", "eu-1")], file=str(ROOT / "config" / "regions.toml")
        )
        got = await RegionMapSource(infos[0].http_url).fetch()
        up = {n.name: n.up for r in got.regions for n in r.nodes}
        assert up == {
            "eu-1": True,
            "eu-2": False,
            "us-1": False,
            "us-2": False,
            "ap-1": False,
            "ap-2": False,
        }
        _, eu1 = got.node("eu-1") or (None, None)
        assert eu1 is not None and eu1.public_key == str(infos[0].public_key)


async def test_failed_fetch_keeps_the_last_good_map(nursery: trio.Nursery) -> None:
    async with open_memory_store() as store:
        infos = await mesh(nursery, store, [("eu", "eu-1")])
        source = RegionMapSource(infos[0].http_url)
        first = await source.fetch()
        source.url = "http://127.0.0.1:1/regionmap"  # the relay serving it went away
        assert await source.fetch() is first
        assert source.last_error is not None
    with pytest.raises(MapFetchError):
        await RegionMapSource("http://127.0.0.1:1").fetch()


async def test_netcheck_loopback_and_http_fallback(nursery: trio.Nursery) -> None:
    async with open_memory_store() as store:
        infos = await mesh(nursery, store, [("eu", "eu-1"), ("us", "us-1"), ("ap", "ap-1")])
        region_map = await RegionMapSource(infos[0].http_url).fetch()
        report = await run_netcheck(region_map, deadline_s=3)
        assert report.udp and report.global_addr and report.global_addr.startswith("127.0.0.1:")
        assert report.mapping_varies_by_dest is False
        assert set(report.region_latency_ms) == {"eu", "us", "ap"}
        assert all(len(p.stun_ms) == 3 for p in report.probes)
        assert report.preferred_relay in {"eu-1", "us-1", "ap-1"}
        # UDP "blocked": STUN ports that answer nothing. HTTP still ranks every region.
        blocked = region_map.model_copy(
            update={
                "regions": [
                    r.model_copy(
                        update={"nodes": [n.model_copy(update={"stun_port": 9}) for n in r.nodes]}
                    )
                    for r in region_map.regions
                ]
            }
        )
        fallback = await run_netcheck(blocked, deadline_s=2)
        assert not fallback.udp and fallback.global_addr is None
        assert set(fallback.region_latency_ms) == {"eu", "us", "ap"}
        assert all(p.http_ms is not None and not p.stun_ms for p in fallback.probes)


async def test_open_home_relay_connects_and_carries_traffic(nursery: trio.Nursery) -> None:
    async with open_memory_store() as store:
        infos = await mesh(nursery, store, [("eu", "eu-1"), ("eu", "eu-2"), ("us", "us-1")])
        a, b = PrivateKey.generate(), PrivateKey.generate()
        async with open_home_relay(infos[2].http_url, a, netcheck_interval_s=3600) as home:
            assert home.client.connected
            by_url = {i.ws_url: i for i in infos}
            connected_to = by_url[home.client.url or ""]
            assert connected_to.name == home.home.relay
            # Failover order: the rest of the home region before other regions.
            regions = [by_url[u].region for u in home.client.urls]
            assert regions[: regions.count(home.home.region)] == [home.home.region] * regions.count(
                home.home.region
            )
            async with open_relay_client(infos[2].ws_url, b) as cb:
                with trio.fail_after(5):
                    await wait_until(
                        lambda: (
                            (
                                connected_to.state is not None
                                and connected_to.state.route(b.public.raw) is not None
                            )
                            or connected_to.server.is_connected(b.public)
                        )
                    )
                await home.client.send(b.public, b"hello from home")
                with trio.fail_after(5):
                    assert (await cb.receive()).payload == b"hello from home"
