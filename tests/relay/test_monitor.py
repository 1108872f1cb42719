"""The mesh monitor on real relays in one process (MemoryStore): status, probes, problems."""

from __future__ import annotations

from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from coordinator.store import MemoryStore, open_memory_store
from relay.client import open_relay_client
from relay.config import load_config
from relay.node import NodeInfo, serve_relay_node
from relay.protocol.keys import PrivateKey

MESH_KEY = b"0123456789abcdef0123456789abcdef"


async def start(
    nursery: trio.Nursery,
    store: MemoryStore,
    region: str,
    name: str,
    mesh: dict[str, Any] | None = None,
    **limits: Any,
) -> NodeInfo:
    cfg = load_config(
        overrides={
            "relay": {"port": 0, "http_port": 0, "stun_port": 0, "region": region, "name": name},
            "mesh": {"lease_ttl_s": 2, "keepalive_interval_s": 0.5, **(mesh or {})},
            "health": {"interval_s": 0.5, "probe_timeout_s": 1.0},
            "limits": limits,
        }
    )
    info: NodeInfo = await nursery.start(
        lambda task_status: serve_relay_node(
            cfg, store=store, mesh_key=MESH_KEY, task_status=task_status
        )
    )
    return info


async def mesh_doc(info: NodeInfo) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        r = await http.get(info.http_url + "/api/v1/mesh")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def wait_doc(info: NodeInfo, ok: Any) -> dict[str, Any]:
    """Rounds until ``ok(doc)``; the last document is in the failure message otherwise."""
    assert info.monitor is not None
    doc: dict[str, Any] = {}
    try:
        with trio.fail_after(15):
            while True:
                await info.monitor.wait_round()
                doc = await mesh_doc(info)
                if ok(doc):
                    return doc
    except trio.TooSlowError:
        raise AssertionError(f"never reached; last document: {doc}") from None


async def test_healthy_mesh_has_every_path_probed_and_no_problem(nursery: trio.Nursery) -> None:
    async with open_memory_store() as store:
        eu = await start(nursery, store, "eu", "eu-1")
        us = await start(nursery, store, "us", "us-1")
        await start(nursery, store, "us", "us-2")

        def all_up(doc: dict[str, Any]) -> bool:
            return (
                doc["summary"]["relays_up"] == 3
                and doc["summary"]["links_up"] == 6
                and all(r["probe"] and r["probe"]["ok"] for r in doc["relays"])
                and all(link["probe_ok"] for link in doc["links"])
            )

        doc = await wait_doc(eu, all_up)
        assert doc["problems"] == [] and doc["healthy"] is True
        assert {r["relay_id"] for r in doc["relays"]} == {"eu-1", "us-1", "us-2"}
        assert [g["region"] for g in doc["regions"]] == ["eu", "us"]
        assert all(link["rtt_ms"] > 0 for link in doc["links"])
        assert doc["etcd"]["reachable"] is True and doc["etcd"]["lease_held"] is True
        # Any relay serves the same mesh.
        other = await wait_doc(us, all_up)
        assert other["served_by"] == "us-1" and other["problems"] == []

        # Every figure of the page is a metric, and prometheus_client's own parser reads them.
        async with httpx.AsyncClient() as http:
            text = (await http.get(eu.http_url + "/metrics")).text
        families = {f.name: f for f in text_string_to_metric_families(text)}

        def samples(name: str) -> dict[tuple[str, ...], float]:
            return {
                tuple(v for k, v in sorted(s.labels.items()) if k not in ("region", "relay")): (
                    s.value
                )
                for s in families[name].samples
            }

        assert samples("relaymesh_probe_success") == {
            ("eu-1",): 1.0,
            ("us-1",): 1.0,
            ("us-2",): 1.0,
        }
        assert all(v > 0 for v in samples("relaymesh_probe_rtt_seconds").values())
        assert samples("relaymesh_mesh_relay_up") == {
            ("eu-1", "eu"): 1.0,
            ("us-1", "us"): 1.0,
            ("us-2", "us"): 1.0,
        }
        assert len(samples("relaymesh_mesh_path_up")) == 6
        assert set(samples("relaymesh_mesh_path_up").values()) == {1.0}
        assert samples("relaymesh_health_healthy") == {(): 1.0}
        assert samples("relaymesh_etcd_reachable") == {(): 1.0}
        assert "relaymesh_health_problem" in families
        assert not families["relaymesh_health_problem"].samples


async def test_probe_finds_a_relay_that_accepts_but_does_not_forward(
    nursery: trio.Nursery,
) -> None:
    async with open_memory_store() as store:
        eu = await start(nursery, store, "eu", "eu-1")
        # A per-client rate of 1 byte/s: the relay accepts connections and completes
        # handshakes, then its readers stall on the first packet and nothing goes through.
        await start(nursery, store, "us", "us-1", rate_bytes_per_s=1, rate_burst_bytes=1)

        def found(doc: dict[str, Any]) -> bool:
            codes = {(p["code"], p["subject"]) for p in doc["problems"]}
            return ("probe_failed", "eu-1>us-1") in codes

        doc = await wait_doc(eu, found)
        us1 = next(r for r in doc["relays"] if r["relay_id"] == "us-1")
        assert us1["state"] == "up"  # it answers HTTP: only the probe tells
        link = next(x for x in doc["links"] if (x["src"], x["dst"]) == ("eu-1", "us-1"))
        assert link["state"] == "down" and link["connected"] is True
        assert doc["healthy"] is False
        async with httpx.AsyncClient() as http:
            text = (await http.get(eu.http_url + "/metrics")).text
        problems = {
            (s.labels["code"], s.labels["subject"])
            for f in text_string_to_metric_families(text)
            if f.name == "relaymesh_health_problem"
            for s in f.samples
        }
        assert ("probe_failed", "eu-1>us-1") in problems
        # The healthy relay's own path is fine.
        eu1 = next(r for r in doc["relays"] if r["relay_id"] == "eu-1")
        assert eu1["probe"]["ok"] is True


async def test_probes_are_admitted_where_relays_ask_for_a_token(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("mesh-token\n")
    async with open_memory_store() as store:
        infos = []
        for region, name in (("eu", "eu-1"), ("us", "us-1")):
            cfg = load_config(
                overrides={
                    "relay": {
                        "port": 0,
                        "http_port": 0,
                        "stun_port": 0,
                        "region": region,
                        "name": name,
                    },
                    "admission": {"policy": "token", "tokens_file": str(tokens)},
                    "mesh": {"lease_ttl_s": 2, "keepalive_interval_s": 0.5},
                    "health": {"interval_s": 0.5, "probe_timeout_s": 1.0},
                }
            )
            infos.append(
                await nursery.start(
                    lambda task_status, cfg=cfg: serve_relay_node(
                        cfg, store=store, mesh_key=MESH_KEY, task_status=task_status
                    )
                )
            )
        doc = await wait_doc(
            infos[0],
            lambda doc: (
                doc["summary"]["relays_up"] == 2
                and all(r["probe"] and r["probe"]["ok"] for r in doc["relays"])
            ),
        )
        assert doc["problems"] == []


async def test_packets_lost_on_one_mesh_link_show_on_that_path_only(nursery: trio.Nursery) -> None:
    async with open_memory_store() as store:
        # A mesh link queue of one packet: a burst across it overflows it.
        eu = await start(nursery, store, "eu", "eu-1", mesh={"link_queue_packets": 1})
        us = await start(nursery, store, "us", "us-1")
        a, b = PrivateKey.generate(), PrivateKey.generate()
        async with open_relay_client(eu.ws_url, a) as ca, open_relay_client(us.ws_url, b) as cb:
            assert eu.state is not None
            with trio.fail_after(10):
                while eu.state.route(b.public.raw) is None:
                    await eu.monitor.wait_round()  # type: ignore[union-attr]

            async def drain() -> None:
                while True:
                    await cb.receive()

            def lossy(doc: dict[str, Any]) -> bool:
                links = {(x["src"], x["dst"]): x for x in doc.get("links", [])}
                return ("eu-1", "us-1") in links and bool(links["eu-1", "us-1"]["drops_per_s"])

            def path_drops(text: str) -> dict[tuple[str, str], float]:
                return {
                    (s.labels["src"], s.labels["dst"]): s.value
                    for f in text_string_to_metric_families(text)
                    if f.name == "relaymesh_mesh_path_drops_per_second"
                    for s in f.samples
                }

            doc: dict[str, Any] = {}
            text = ""
            async with trio.open_nursery() as inner, httpx.AsyncClient() as http:
                inner.start_soon(drain)
                with trio.fail_after(30):
                    # Bursts until one round saw drops in both the document and /metrics.
                    while not (lossy(doc) and path_drops(text).get(("eu-1", "us-1"))):
                        for _ in range(200):
                            ca.send_nowait(b.public, b"x" * 1000)
                        await eu.monitor.wait_round()  # type: ignore[union-attr]
                        doc = await mesh_doc(eu)
                        text = (await http.get(eu.http_url + "/metrics")).text
                inner.cancel_scope.cancel()
        links = {(x["src"], x["dst"]): x for x in doc["links"]}
        assert links["eu-1", "us-1"]["drops"] > 0 and links["eu-1", "us-1"]["pps"] > 0
        assert links["us-1", "eu-1"]["drops"] == 0  # the other way is fine
        assert path_drops(text)["us-1", "eu-1"] == 0
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert "relaymesh_mesh_path_packets_per_second" in families
        link_drops = {
            s.labels["peer"]: s.value for s in families["relaymesh_mesh_link_drops"].samples
        }
        assert link_drops["us-1"] >= links["eu-1", "us-1"]["drops"]  # a counter, read later
