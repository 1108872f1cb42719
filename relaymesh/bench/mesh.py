"""``relaymesh bench --scenario mesh|failover|registration``: figures for the mesh.

All three run real relay processes (``relaymesh relay``) against a local etcd
started for the run (the ``etcd`` binary must be on PATH), on loopback:

- **mesh**: the same sender/receiver streams as the plain bench, with both
  clients on one relay and across a mesh hop (sender on eu-1, receiver on
  us-1), alternating, ``--runs`` times on one mesh. Reports both (min, median,
  max over the runs; loss, the relays' drops by reason and their CPU over the
  steady window, per run) and the ratio.
- **registration**: clients connect to eu-1 one after another; for each, the
  time from starting to connect to its record being PRESENT in the cache of
  every other relay (us-1, ap-1), read back to back from their
  ``/api/v1/peers/<key>`` with the operator token (so the figure includes an
  HTTP poll, ~1 ms).
- **failover**: clients connected to us-1 (knowing us-1 and us-2), a prober on
  eu-1 sending to each every 20 ms; us-1 is killed with SIGKILL, and for each
  client the time from the kill to the first probe it receives again.

The work directory (etcd's data, the mesh key, the relays' config) is removed
when the run ends, whether it finished, failed, or was stopped with Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import trio

from relay.app import api_token
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
from .relay import check_size, percentiles, ratio, stream, summarize

__all__ = ["run_failover", "run_mesh", "run_registration"]

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
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        etcd = start_etcd(workdir / "etcd")
        endpoint = etcd.endpoints[0]
        mesh_key = write_mesh_key(workdir / "mesh.key")
        # The relay's mesh key is the file's stripped text; the bench reads the peer API.
        token = api_token(mesh_key.read_bytes().strip())
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
        yield (
            [
                {**r.wait_started().info, "pid": r.pid, "proc": r.proc, "api_token": token}
                for r in relays
            ],
            endpoint,
        )
    finally:
        try:
            stop_processes(r.proc for r in relays)
            if etcd is not None:
                etcd.stop_all(kill=False)
        finally:
            if main:
                signal.signal(signal.SIGTERM, old_term)
            shutil.rmtree(workdir, ignore_errors=True)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C does, so the work directory (mesh key included) is removed.
    raise SystemExit(128 + signum)


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


def _drops(relays: list[dict[str, Any]]) -> dict[str, int]:
    """The relays' drop counters, summed by reason."""
    total: dict[str, int] = {}
    for relay in relays:
        for reason, n in _status(relay["http_url"])["stats"]["drops"].items():
            total[reason] = total.get(reason, 0) + n
    return total


def run_mesh(size: int, seconds: float, runs: int = 5, progress: bool = True) -> dict[str, Any]:
    """``runs`` runs on one mesh, each within one relay and then across the hop."""
    check_size(size)
    within: list[dict[str, Any]] = []
    across: list[dict[str, Any]] = []
    with _mesh([("eu", "eu-1"), ("us", "us-1")]) as (relays, _):
        eu, us = relays
        base = ["--target", "relay", "--size", str(size)]
        for i in range(runs):
            within.append(
                stream(
                    [*base, "--url", eu["ws_url"]],
                    [*base, "--url", eu["ws_url"]],
                    seconds,
                    1,
                    [eu["pid"]],
                    drops=lambda: _drops([eu]),
                )
            )
            across.append(
                stream(
                    [*base, "--url", eu["ws_url"]],
                    [*base, "--url", us["ws_url"]],
                    seconds,
                    1,
                    [eu["pid"], us["pid"]],
                    before_send=lambda keys: _wait_peers(eu, 1),
                    drops=lambda: _drops([eu, us]),
                )
            )
            if progress:
                for name, r in (("within one relay", within[-1]), ("across", across[-1])):
                    print(
                        f"mesh, run {i + 1}/{runs}, {name}: {r['pps']:,} packets/s,"
                        f" loss {r['loss_pct']}%, cpu {r['server_cpu_pct_each']}%",
                        file=sys.stderr,
                        flush=True,
                    )
    return {
        "scenario": "mesh",
        "size": size,
        "seconds": seconds,
        "runs": runs,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d"),
        "within_one_relay": {"runs": within, "summary": summarize(within)},
        "across_mesh_hop": {"runs": across, "summary": summarize(across)},
        "mesh_vs_within": ratio(across, within),
    }


def _peer_known(relay: dict[str, Any], node_key: str) -> bool:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{relay['http_url']}/api/v1/peers/{node_key}",
        headers={"Authorization": f"Bearer {relay['api_token']}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
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
                while not await trio.to_thread.run_sync(_peer_known, relay, key):
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
