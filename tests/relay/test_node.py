"""A whole relay node: data plane and HTTP API on real sockets."""

from __future__ import annotations

import json

import httpx
import trio

from relay.client import open_relay_client
from relay.config import load_config
from relay.node import NodeInfo, serve_relay_node
from relay.protocol.keys import PrivateKey


async def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    async with httpx.AsyncClient() as client:
        r = await client.get(url)
    return r.status_code, dict(r.headers), r.content


async def start_node(nursery: trio.Nursery, **relay: object) -> NodeInfo:
    cfg = load_config(
        overrides={
            "relay": {
                "port": 0,
                "http_port": 0,
                "stun_port": 0,
                "region": "eu",
                "name": "eu-1",
                **relay,
            },
            # The mesh monitor's probe clients would count among the clients.
            "health": {"enabled": False},
        }
    )
    info: NodeInfo = await nursery.start(serve_relay_node, cfg)
    return info


async def test_health_status_and_metrics_reflect_traffic(nursery: trio.Nursery) -> None:
    info = await start_node(nursery)
    status, _, body = await http_get(info.http_url + "/healthz")
    assert status == 200 and body == b"ok\n"

    a, b = PrivateKey.generate(), PrivateKey.generate()
    async with open_relay_client(info.ws_url, a) as ca, open_relay_client(info.ws_url, b) as cb:
        await ca.send(b.public, b"one")
        await ca.send(PrivateKey.generate().public, b"to nobody")
        with trio.fail_after(5):
            await cb.receive()
        status, _, body = await http_get(info.http_url + "/api/v1/status")
        doc = json.loads(body)
        assert status == 200
        assert doc["region"] == "eu" and doc["name"] == "eu-1"
        assert doc["public_key"] == str(info.public_key)
        assert doc["stats"]["clients"] == 2

    status, headers, body = await http_get(info.http_url + "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'relaymesh_packets_received_total{region="eu",relay="eu-1"} 2.0' in text
    assert (
        'relaymesh_packets_dropped_total{reason="unknown_dest",region="eu",relay="eu-1"} 1.0'
        in text
    )
    assert (
        'relaymesh_connections_closed_total{reason="closed_by_peer",region="eu",relay="eu-1"} 2.0'
        in text
    )


async def test_latency_probe_endpoints(nursery: trio.Nursery) -> None:
    info = await start_node(nursery)
    for path in ("/generate_204", "/derp/latency-check"):
        status, _, body = await http_get(info.http_url + path)
        assert status == 204 and body == b""


async def test_key_file_is_created_and_reused(nursery: trio.Nursery, tmp_path: object) -> None:
    from pathlib import Path

    key_file = Path(str(tmp_path)) / "relay.key"
    first = await start_node(nursery, key_file=str(key_file))
    assert key_file.exists()
    second = await start_node(nursery, key_file=str(key_file))
    assert first.public_key == second.public_key
