"""A whole relay node: data plane and HTTP API on real sockets."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from relay.client import open_relay_client
from relay.config import load_config
from relay.node import NodeInfo, serve_relay_node
from relay.protocol.keys import PrivateKey
from tests.conftest import wait_until


async def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    async with httpx.AsyncClient() as client:
        r = await client.get(url)
    return r.status_code, dict(r.headers), r.content


async def start_node(
    nursery: trio.Nursery, health: dict[str, object] | None = None, **relay: object
) -> NodeInfo:
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
            # Not among the clients, but the monitor's probe packets would count among the
            # packets (test_probe_clients_are_not_counted_as_clients runs it).
            "health": health or {"enabled": False},
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


async def test_probe_clients_are_not_counted_as_clients(nursery: trio.Nursery) -> None:
    from relay.client import ConnectError
    from tests.relay.hostile import closes_total

    info = await start_node(nursery, health={"enabled": True})
    server = info.server
    # A lone relay's monitor probes it with two clients: a sender and an echo.
    with trio.fail_after(10):
        await wait_until(lambda: server.statistics().probe_clients == 2)
    a = PrivateKey.generate()
    async with open_relay_client(info.ws_url, a):
        _, _, body = await http_get(info.http_url + "/api/v1/status")
        stats = json.loads(body)["stats"]
        assert (stats["clients"], stats["probe_clients"]) == (1, 2)
        _, _, body = await http_get(info.http_url + "/metrics")
        text = body.decode()
        assert 'relaymesh_clients{region="eu",relay="eu-1"} 1.0' in text
        assert 'relaymesh_probe_clients{region="eu",relay="eu-1"} 2.0' in text
        assert {c.is_probe for c in server.client_statistics()} == {True, False}

    # Only the relay's own probe secret (the mesh key in a mesh) makes a probe client.
    with pytest.raises(ConnectError, match="4007"):
        async with open_relay_client(
            info.ws_url, PrivateKey.generate(), mesh_key=b"x" * 32, probe=True
        ):
            pass  # pragma: no cover
    assert closes_total(server, "bad_mesh_key") == 1
    async with open_relay_client(
        info.ws_url, PrivateKey.generate(), mesh_key=server.probe_key, probe=True
    ):
        assert server.statistics().probe_clients == 3
        assert server.statistics().clients == 0


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
