"""Faults injected into one component of a node: the node stays up and counts them.

Relays share a MemoryStore in one process, on real sockets. After each fault
a normal client pair still exchanges packets, ``/healthz`` answers, and
``/metrics`` shows the failure under its component.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import relay.stun_server
from coordinator.state import MeshState
from coordinator.store import MemoryStore, open_memory_store
from relay.client import RelayClient, open_relay_client
from relay.config import load_config
from relay.mesh import Mesh
from relay.node import ListenError, NodeInfo, serve_relay_node
from relay.protocol.keys import PrivateKey
from relay.protocol.stun import decode_response, encode_request
from tests.conftest import wait_until

MESH_KEY = b"0123456789abcdef0123456789abcdef"


async def start(
    nursery: trio.Nursery,
    store: MemoryStore,
    name: str,
    *,
    region: str = "eu",
    key: PrivateKey | None = None,
) -> NodeInfo:
    cfg = load_config(
        overrides={
            "relay": {"port": 0, "http_port": 0, "stun_port": 0, "region": region, "name": name},
            "mesh": {"lease_ttl_s": 2, "keepalive_interval_s": 0.5},
        }
    )
    info: NodeInfo = await nursery.start(
        lambda task_status: serve_relay_node(
            cfg, key=key, store=store, mesh_key=MESH_KEY, task_status=task_status
        )
    )
    return info


async def metrics(info: NodeInfo) -> dict[tuple[str, str], float]:
    """(sample name, component label) -> value, for the component metrics."""
    async with httpx.AsyncClient() as client:
        r = await client.get(info.http_url + "/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if "component" in sample.labels:
                out[(sample.name, sample.labels["component"])] = sample.value
    return out


async def assert_alive(*nodes: NodeInfo) -> None:
    """Every node answers /healthz, and a pair across the first and last exchanges packets."""
    async with httpx.AsyncClient() as client:
        for info in nodes:
            r = await client.get(info.http_url + "/healthz")
            assert r.status_code == 200 and r.text == "ok\n"
    first, last = nodes[0], nodes[-1]
    a, b = PrivateKey.generate(), PrivateKey.generate()
    async with open_relay_client(first.ws_url, a) as ca, open_relay_client(last.ws_url, b) as cb:
        if first is not last:
            assert first.state is not None and last.state is not None
            with trio.fail_after(10):
                await wait_until(
                    lambda: (
                        first.state.route(b.public.raw) is not None
                        and last.state.route(a.public.raw) is not None
                    )
                )
        for i in range(10):
            await ca.send(b.public, b"a->b %d" % i)
            await cb.send(a.public, b"b->a %d" % i)
        with trio.fail_after(10):
            got_b = [(await cb.receive()).payload for _ in range(10)]
            got_a = [(await ca.receive()).payload for _ in range(10)]
    assert got_b == [b"a->b %d" % i for i in range(10)]
    assert got_a == [b"b->a %d" % i for i in range(10)]


async def wait_mesh_ready(*nodes: NodeInfo) -> None:
    with trio.fail_after(10):
        for info in nodes:
            assert info.state is not None and info.mesh is not None
            await wait_until(
                lambda info=info: (
                    len(info.state.relays) == len(nodes) and not info.mesh.region_links_down()
                )
            )


def fail_once(original: Callable[..., Any], when: Callable[..., bool] = lambda *a: True) -> Any:
    """``original``, except that the first call for which ``when`` holds raises."""
    calls: list[object] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not calls and when(*args, **kwargs):
            calls.append(args)
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    wrapper.calls = calls  # type: ignore[attr-defined]
    return wrapper


async def test_presence_consumer_fault_is_retried_and_counted(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = fail_once(MeshState.client_connected)
    monkeypatch.setattr(MeshState, "client_connected", failing)
    async with open_memory_store() as store:
        eu = await start(nursery, store, "eu-1")
        assert eu.state is not None
        a = PrivateKey.generate()
        async with open_relay_client(eu.ws_url, a):
            # The change that failed is applied on the next try: the peer is published
            # (and the sync loop, reading the store back, routes it here).
            with trio.fail_after(10):
                await wait_until(lambda: eu.state.route(a.public.raw) is not None)
            snap = await store.get_prefix(f"/relaymesh/v1/peers/{a.public}")
            assert len(snap.items) == 1
        assert failing.calls
        assert eu.state.statistics().presence_errors == 1
        await assert_alive(eu)
        assert (await metrics(eu))[("relaymesh_component_errors_total", "presence")] == 1


async def test_forwarder_fault_drops_one_packet_and_is_counted(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Mesh, "forward_frames", fail_once(Mesh.forward_frames))
    async with open_memory_store() as store:
        eu = await start(nursery, store, "eu-1")
        us = await start(nursery, store, "us-1", region="us")
        a, b = PrivateKey.generate(), PrivateKey.generate()
        async with open_relay_client(eu.ws_url, a) as ca, open_relay_client(us.ws_url, b) as cb:
            assert eu.state is not None
            with trio.fail_after(10):
                await wait_until(lambda: eu.state.route(b.public.raw) is not None)
            await ca.send(b.public, b"lost")
            # Packets that arrive together are forwarded as one run: wait for this one's fate.
            with trio.fail_after(10):
                await wait_until(lambda: eu.server.statistics().drops["forward_error"] == 1)
            await ca.send(b.public, b"delivered")
            with trio.fail_after(10):
                assert (await cb.receive()).payload == b"delivered"
        assert eu.server.statistics().drops["forward_error"] == 1
        await assert_alive(eu, us)
        assert (await metrics(eu))[("relaymesh_component_errors_total", "forwarder")] == 1


async def test_mesh_link_taken_over_is_reopened_and_counted(nursery: trio.Nursery) -> None:
    """Another connection with this relay's key replaces its link (RelayClosedError)."""
    async with open_memory_store() as store:
        key = PrivateKey.generate()
        eu1 = await start(nursery, store, "eu-1", key=key)
        eu2 = await start(nursery, store, "eu-2")
        await wait_mesh_ready(eu1, eu2)
        impostor = RelayClient([eu2.ws_url], key, mesh_key=MESH_KEY)
        async with trio.open_nursery() as inner:
            await inner.start(impostor.run)
            assert eu1.mesh is not None
            with trio.fail_after(10):
                await wait_until(lambda: eu1.mesh.link_failures.get("eu-2", 0) >= 1)
            inner.cancel_scope.cancel()
        await wait_mesh_ready(eu1, eu2)
        await assert_alive(eu1, eu2)
        assert (await metrics(eu1))[("relaymesh_component_errors_total", "mesh_link")] >= 1


async def test_mesh_link_error_is_reopened_and_counted(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    def is_link(client: RelayClient) -> bool:
        # Mesh links and the monitor's probe clients both hold the mesh key.
        return client._mesh_key is not None and not client._probe

    monkeypatch.setattr(RelayClient, "receive", fail_once(RelayClient.receive, is_link))
    async with open_memory_store() as store:
        eu1 = await start(nursery, store, "eu-1")
        eu2 = await start(nursery, store, "eu-2")
        assert eu1.mesh is not None and eu2.mesh is not None
        with trio.fail_after(10):
            await wait_until(
                lambda: (
                    sum(eu1.mesh.link_failures.values()) + sum(eu2.mesh.link_failures.values()) == 1
                )
            )
        await wait_mesh_ready(eu1, eu2)
        await assert_alive(eu1, eu2)
        assert sum(eu1.mesh.link_failures.values()) + sum(eu2.mesh.link_failures.values()) == 1


async def test_relay_table_consumer_fault_restarts_the_mesh_only(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the state sync used to run as a callback now fails in the mesh's own task."""

    def sees_eu2(mesh: Mesh) -> bool:
        return mesh._me.relay_id == "eu-1" and "eu-2" in mesh._state.relays

    monkeypatch.setattr(Mesh, "_reconcile", fail_once(Mesh._reconcile, sees_eu2))
    async with open_memory_store() as store:
        eu1 = await start(nursery, store, "eu-1")
        eu2 = await start(nursery, store, "eu-2")
        with trio.fail_after(10):
            await wait_until(lambda: eu1.supervisor.statistics().restarts.get("mesh") == 1)
        await wait_mesh_ready(eu1, eu2)
        await assert_alive(eu1, eu2)
        stats = eu1.supervisor.statistics()
        assert stats.restarts == {"mesh": 1}
        assert "injected fault" in stats.last_failure["mesh"]
        assert eu1.state is not None and eu1.state.synced
        assert (await metrics(eu1))[("relaymesh_component_restarts_total", "mesh")] == 1


async def stun_ask(port: int) -> tuple[str, int] | None:
    """The address a STUN binding request to ``port`` reports, or None if unanswered."""
    tid = b"\x01" * 12
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        await sock.sendto(encode_request(tid), ("127.0.0.1", port))
        with trio.move_on_after(0.5):
            data, _ = await sock.recvfrom(2048)
            got, ip, mapped = decode_response(data)
            assert got == tid
            return ip, mapped
    return None


async def test_stun_faults_are_contained(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = relay.stun_server.handle_datagram
    monkeypatch.setattr(relay.stun_server, "handle_datagram", fail_once(real))
    async with open_memory_store() as store:
        eu = await start(nursery, store, "eu-1")
        # A datagram whose handling raises is dropped and counted; the next is answered.
        assert await stun_ask(eu.stun_port) is None
        assert await stun_ask(eu.stun_port) is not None
        # A failure outside one datagram's handling (here: a reply that is not bytes)
        # ends the STUN loop: the supervisor brings it back on the same port.
        monkeypatch.setattr(
            relay.stun_server, "handle_datagram", lambda *args: 42 if not args[0] else real(*args)
        )
        quiet = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with quiet:
            await quiet.sendto(b"", ("127.0.0.1", eu.stun_port))
        with trio.fail_after(10):
            await wait_until(lambda: eu.supervisor.statistics().restarts.get("stun") == 1)
            while await stun_ask(eu.stun_port) is None:
                pass
        await assert_alive(eu)
        found = await metrics(eu)
        assert found[("relaymesh_component_errors_total", "stun")] == 1
        assert found[("relaymesh_component_restarts_total", "stun")] == 1


BAD_CHUNK = (
    b"GET /healthz HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"
)


async def test_chunked_request_with_a_bad_chunk_header_closes_only_that_connection(
    nursery: trio.Nursery,
) -> None:
    """hypercorn's trio TCPServer races its 400 against the app's half-close."""
    async with open_memory_store() as store:
        eu = await start(nursery, store, "eu-1")
        port = int(eu.http_url.rsplit(":", 1)[1])

        async def errors() -> float:
            return (await metrics(eu)).get(("relaymesh_component_errors_total", "http"), 0)

        with trio.fail_after(30):
            tries = 0
            while await errors() == 0:
                tries += 1
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(BAD_CHUNK)
                    if tries % 2:
                        # Half the time the client resets the connection at once.
                        linger = struct.pack("ii", 1, 0)
                        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                        continue
                    with trio.move_on_after(1):
                        while await stream.receive_some(4096):
                            pass
        await assert_alive(eu)
        assert eu.supervisor.statistics().restarts == {}


async def test_a_port_taken_at_start_ends_the_node_with_that_error(
    nursery: trio.Nursery,
) -> None:
    taken = socket.socket()
    with taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = load_config(
            overrides={"relay": {"port": 0, "http_port": taken.getsockname()[1], "stun_port": 0}}
        )
        with trio.fail_after(5), pytest.raises(ListenError) as caught:
            await nursery.start(serve_relay_node, cfg)
        assert "in use" in str(caught.value)
        assert f":{taken.getsockname()[1]} (HTTP)" in str(caught.value)
