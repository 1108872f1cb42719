"""``relaymesh bench --scenario mesh|failover|registration``: figures for the mesh.

All three run real relay processes (``relaymesh relay``) against a local etcd
started for the run (the ``etcd`` binary must be on PATH), on loopback:

- **mesh**: the same sender/receiver streams as the plain bench, once with
  both clients on one relay and once across a mesh hop (sender on eu-1,
  receiver on us-1), in the same invocation. Reports both and the ratio.
- **registration**: clients connect to eu-1 one after another; for each, the
  time from starting to connect to its record being PRESENT in the cache of
  every other relay (us-1, ap-1), read back to back from their
  ``/api/v1/peers/<key>`` (so the figure includes an HTTP poll, ~1 ms).
- **failover**: clients connected to us-1 (knowing us-1 and us-2), a prober on
  eu-1 sending to each every 20 ms; us-1 is killed with SIGKILL, and for each
  client the time from the kill to the first probe it receives again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from relay.client import RelayClient, open_relay_client
from relay.protocol.keys import PrivateKey

from ..procs import (
    EtcdCluster,
    RelayProc,
    spawn_relay,
    start_etcd,
    stop_processes,
    write_mesh_key,
)
from .relay import percentiles, stream

__all__ = ["run_scenario"]

_TEST_MESH = """
[mesh]
lease_ttl_s = 4
keepalive_interval_s = 1.0
"""


@contextmanager
def _mesh(specs: list[tuple[str, str]]) -> Iterator[tuple[list[dict[str, Any]], str]]:
    """Relay processes for (region, name) pairs on a fresh local etcd.

    Everything lives in one temporary directory (the mesh key among it), removed at exit.
    """
    workdir = Path(tempfile.mkdtemp(prefix="relaymesh-bench-"))
    relays: list[RelayProc] = []
    etcd: EtcdCluster | None = None
    try:
        etcd = start_etcd(workdir / "etcd")
        endpoint = etcd.endpoints[0]
        mesh_key = write_mesh_key(workdir / "mesh.key")
        (workdir / "relay.toml").write_text(_TEST_MESH)
        for region, name in specs:
            relays.append(
                spawn_relay(
                    workdir,
                    region=region,
                    name=name,
                    etcd=endpoint,
                    mesh_key_file=mesh_key,
                    config=workdir / "relay.toml",
                    log=False,
                )
            )
        yield [{**r.wait_started().info, "pid": r.pid, "proc": r.proc} for r in relays], endpoint
    finally:
        stop_processes(r.proc for r in relays)
        if etcd is not None:
            etcd.stop_all(kill=False)
        shutil.rmtree(workdir, ignore_errors=True)


def _status(http_url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(http_url + "/api/v1/status", timeout=5) as resp:
        return dict(json.loads(resp.read()))


def _wait_peers(relay: dict[str, Any], n: int, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _status(relay["http_url"])["shared_state"]["peers_present"] >= n:
            return
        time.sleep(0.02)
    raise RuntimeError(f"relay {relay['name']} did not learn {n} peers in {timeout_s} s")


def run_mesh(size: int, seconds: float) -> dict[str, Any]:
    with _mesh([("eu", "eu-1"), ("us", "us-1")]) as (relays, _):
        eu, us = relays
        base = ["--target", "relay", "--size", str(size)]
        within = stream(
            [*base, "--url", eu["ws_url"]], [*base, "--url", eu["ws_url"]], seconds, 1, [eu["pid"]]
        )
        across = stream(
            [*base, "--url", eu["ws_url"]],
            [*base, "--url", us["ws_url"]],
            seconds,
            1,
            [eu["pid"], us["pid"]],
            before_send=lambda keys: _wait_peers(eu, 1),
        )
    return {
        "scenario": "mesh",
        "size": size,
        "seconds": seconds,
        "within_one_relay": within,
        "across_mesh_hop": across,
        "mesh_vs_within_pct": round(100 * across["pps"] / within["pps"], 1),
    }


def _peer_known(http_url: str, node_key: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{http_url}/api/v1/peers/{node_key}", timeout=5) as resp:
            return bool(json.loads(resp.read()).get("state") == "present")
    except urllib.error.HTTPError:
        return False


async def _registration(relays: list[dict[str, Any]], n: int) -> dict[str, Any]:
    origin, others = relays[0], relays[1:]
    samples = []
    for _ in range(n):
        key = PrivateKey.generate()
        t0 = time.monotonic()
        async with open_relay_client(origin["ws_url"], key):
            seen: list[float] = []

            async def poll(relay: dict[str, Any], key: str, seen: list[float]) -> None:
                while not await trio.to_thread.run_sync(_peer_known, relay["http_url"], key):
                    pass
                seen.append(time.monotonic())

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for relay in others:
                        nursery.start_soon(poll, relay, str(key.public), seen)
            samples.append(int((max(seen) - t0) * 1e9))
    return {"clients": n, "visible_everywhere_ms": percentiles(samples)}


def run_registration(n: int) -> dict[str, Any]:
    with _mesh([("eu", "eu-1"), ("us", "us-1"), ("ap", "ap-1")]) as (relays, _):
        result = trio.run(_registration, relays, n)
    return {
        "scenario": "registration",
        **result,
        "note": "client starts connecting to eu-1 → us-1 and ap-1 both answer"
        " /api/v1/peers/<key> with state present (polled back to back over HTTP)",
    }


async def _failover(relays: list[dict[str, Any]], n: int) -> dict[str, Any]:
    eu, us1, us2 = relays
    keys = [PrivateKey.generate() for _ in range(n)]
    recovered: dict[int, float] = {}
    async with trio.open_nursery() as nursery:
        clients: list[RelayClient] = []
        for k in keys:
            c = RelayClient([us1["ws_url"], us2["ws_url"]], k, backoff_initial_s=0.05)
            await nursery.start(c.run)
            clients.append(c)
        prober = RelayClient([eu["ws_url"]], PrivateKey.generate())
        await nursery.start(prober.run)
        await trio.to_thread.run_sync(_wait_peers, eu, n + 1)
        killed_at = 0.0

        async def listen(i: int, c: RelayClient) -> None:
            while True:
                p = await c.receive()
                if killed_at and p.payload == b"after" and i not in recovered:
                    recovered[i] = time.monotonic() - killed_at

        for i, c in enumerate(clients):
            nursery.start_soon(listen, i, c)
        os.kill(us1["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        with trio.move_on_after(20):
            while len(recovered) < n:
                for c in clients:
                    prober.send_nowait(c.public_key, b"after")
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    samples = [int(v * 1e9) for v in recovered.values()]
    return {"clients": n, "recovered": len(recovered), "reachable_again_ms": percentiles(samples)}


def run_failover(n: int) -> dict[str, Any]:
    with _mesh([("eu", "eu-1"), ("us", "us-1"), ("us", "us-2")]) as (relays, _):
        result = trio.run(_failover, relays, n)
    return {
        "scenario": "failover",
        **result,
        "note": "SIGKILL of us-1 → first probe from eu-1 received again via us-2",
    }


def run_scenario(name: str, *, size: int, seconds: float) -> dict[str, Any]:
    if name == "mesh":
        return run_mesh(size, seconds)
    if name == "registration":
        return run_registration(200)
    if name == "failover":
        return run_failover(20)
    raise ValueError(f"unknown scenario {name!r}")
