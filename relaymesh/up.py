"""``relaymesh up``: a whole multi-region mesh on one machine.

Two ways to run it:

- **embedded** (default): every relay in this one process, sharing a
  MemoryStore and a mesh key made up for the run. No external service.
- **processes** (``--etcd auto`` or ``--etcd URL``): one ``relaymesh relay``
  process per relay, sharing an etcd: a local one started for the run
  (``auto``, needs the ``etcd`` binary on PATH) or the one given. This is the
  same topology as docker-compose.yml, on loopback.

It prints the WebSocket and HTTP URLs of every relay (``--json`` for
scripts; ``--state-file`` writes the same JSON to a file) and stops cleanly on
Ctrl-C or SIGTERM: relays tell their clients to move, then exit.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from relay.config import load_config

from .procs import EtcdCluster, RelayProc, spawn_relay, start_etcd, stop_processes, write_mesh_key

__all__ = ["UpOptions", "run_up"]


@dataclass(frozen=True, kw_only=True)
class UpOptions:
    regions: list[str]
    relays_per_region: int
    base_port: int
    etcd: str  # "none", "auto", or endpoints
    state_file: Path | None
    json: bool
    listen_host: str = "127.0.0.1"


def _layout(opts: UpOptions) -> list[dict[str, Any]]:
    relays = []
    i = 0
    for region in opts.regions:
        for n in range(1, opts.relays_per_region + 1):
            port = opts.base_port + 2 * i if opts.base_port else 0
            relays.append(
                {
                    "region": region,
                    "name": f"{region}-{n}",
                    "port": port,
                    "http_port": port + 1 if port else 0,
                    "stun_port": 3478 + i if port else 0,
                }
            )
            i += 1
    return relays


def _report(opts: UpOptions, mode: str, relays: list[dict[str, Any]], etcd: list[str]) -> None:
    doc = {"mode": mode, "etcd": etcd, "relays": relays}
    if opts.state_file is not None:
        tmp = opts.state_file.with_suffix(opts.state_file.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(opts.state_file)
    if opts.json:
        print(json.dumps(doc), flush=True)
        return
    where = (
        "in this process, shared state in memory"
        if mode == "embedded"
        else f"one process each, shared state in etcd {','.join(etcd)}"
    )
    print(
        f"relaymesh up: {len(relays)} relays in {len({r['region'] for r in relays})} regions,"
        f" {where}"
    )
    print(f"  {'relay':<10}{'region':<8}{'websocket':<34}http")
    for r in relays:
        print(f"  {r['relay_id']:<10}{r['region']:<8}{r['ws_url']:<34}{r['http_url']}")
    first = relays[0]
    print(f"status: {first['http_url']}/api/v1/status   metrics: {first['http_url']}/metrics")
    print("try, in two more terminals:")
    print(
        "  relaymesh keygen --out b.key && relaymesh listen --url"
        f" {relays[-1]['http_url']} --key-file b.key"
    )
    print(
        "  relaymesh keygen --out a.key && relaymesh ping --url"
        f" {first['http_url']} --key-file a.key <b's nodekey>"
    )
    print("Ctrl-C stops the mesh.", flush=True)


def run_up(opts: UpOptions) -> int:
    if opts.etcd == "none":
        trio.run(_embedded, opts)
    else:
        _processes(opts)
    return 0


# ---- embedded --------------------------------------------------------------


async def _embedded(opts: UpOptions) -> None:
    from coordinator.store import open_memory_store
    from relay.node import NodeInfo, serve_relay_node

    mesh_key = secrets.token_bytes(32)
    async with open_memory_store() as store, trio.open_nursery() as nursery:
        infos: list[NodeInfo] = []
        for spec in _layout(opts):
            cfg = load_config(overrides={"relay": {**spec, "listen_host": opts.listen_host}})
            infos.append(
                await nursery.start(
                    lambda task_status, cfg=cfg: serve_relay_node(
                        cfg, store=store, mesh_key=mesh_key, task_status=task_status
                    )
                )
            )
        with trio.fail_after(10):
            for info in infos:
                assert info.state is not None
                await info.state.wait_synced()
        _report(opts, "embedded", [_describe(i) for i in infos], [])
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        async with trio.open_nursery() as draining:
            for info in infos:
                draining.start_soon(partial(info.server.drain, grace_s=2.0))
        nursery.cancel_scope.cancel()


def _describe(info: Any) -> dict[str, Any]:
    return {
        "relay_id": info.relay_id,
        "region": info.region,
        "ws_url": info.ws_url,
        "http_url": info.http_url,
        "public_key": str(info.public_key),
    }


# ---- one process per relay ----------------------------------------------------


def _processes(opts: UpOptions) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="relaymesh-up-"))
    relays: list[RelayProc] = []
    etcd: EtcdCluster | None = None
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    try:
        if opts.etcd == "auto":
            etcd = start_etcd(workdir / "etcd")
            endpoints = ",".join(etcd.endpoints)
        else:
            endpoints = opts.etcd
        mesh_key_file = write_mesh_key(workdir / "mesh.key")
        for spec in _layout(opts):
            relays.append(
                spawn_relay(
                    workdir,
                    region=spec["region"],
                    name=spec["name"],
                    etcd=endpoints,
                    mesh_key_file=mesh_key_file,
                    key_file=workdir / f"{spec['name']}.key",
                    port=spec["port"],
                    http_port=spec["http_port"],
                    stun_port=spec["stun_port"],
                    listen_host=opts.listen_host,
                    log=None,
                )
            )
        described = []
        for relay in relays:
            info = relay.wait_started().info
            described.append(
                {
                    "relay_id": info["name"],
                    "region": info["region"],
                    "ws_url": info["ws_url"],
                    "http_url": info["http_url"],
                    "public_key": info["public_key"],
                    "pid": relay.pid,
                }
            )
        _report(opts, "processes", described, endpoints.split(","))
        while not stop and all(r.proc.poll() is None for r in relays):
            time.sleep(0.2)
    finally:
        stop_processes(r.proc for r in relays)
        if etcd is not None:
            etcd.stop_all(kill=False)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(workdir, ignore_errors=True)
