"""``relaymesh up``: a whole multi-region mesh on one machine.

Two ways to run it:

- **embedded** (default): every relay in this one process, sharing a
  MemoryStore and a mesh key made up for the run. No external service.
- **processes** (``--etcd auto`` or ``--etcd URL``): one ``relaymesh relay``
  process per relay, sharing an etcd: a local one started for the run
  (``auto``, needs the ``etcd`` binary on PATH) or the one given. This is the
  same topology as docker-compose.yml, on loopback.

With ``--tls`` the relays serve wss:// and https:// with certificates from a
CA made up for the run (trustme), whose file ``up`` prints for clients
(``--ca-file`` or ``SSL_CERT_FILE``); the relays trust it for their mesh links.

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

from .errors import UserError
from .hints import command_name
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
    #: Serve wss:// and https:// with a CA made up for the run.
    tls: bool = False


def _make_tls(opts: UpOptions, where: Path) -> dict[str, dict[str, str]]:
    """A CA for this run and one certificate for every relay; the config sections for them."""
    import trustme

    where.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="relaymesh up")
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    names = ["127.0.0.1", "localhost"]
    if opts.listen_host not in ("0.0.0.0", "::", "", *names):
        names.append(opts.listen_host)
    leaf = ca.issue_cert(*names)
    leaf.private_key_and_cert_chain_pem.write_to_path(str(where / "relay.pem"))
    return {
        "tls": {"cert_file": str(where / "relay.pem"), "key_file": str(where / "relay.pem")},
        "mesh": {"ca_file": str(where / "ca.pem")},
    }


#: STUN (UDP) ports start this far above the base port: 3478, STUN's own port, for
#: the default base 3340, and another range beside another ``up`` with another base.
STUN_OFFSET = 3478 - 3340


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
                    "stun_port": opts.base_port + STUN_OFFSET + i if port else 0,
                }
            )
            i += 1
    return relays


def _report(
    opts: UpOptions,
    mode: str,
    relays: list[dict[str, Any]],
    etcd: list[str],
    ca_file: str | None = None,
) -> None:
    doc = {"mode": mode, "etcd": etcd, "relays": relays, "ca_file": ca_file}
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
    print(f"  {'relay':<10}{'region':<8}{'websocket':<34}{'http':<26}stun (udp)")
    for r in relays:
        print(
            f"  {r['relay_id']:<10}{r['region']:<8}{r['ws_url']:<34}{r['http_url']:<26}"
            f"{r['stun_port'] or '-'}"
        )
    first = relays[0]
    print(f"status: {first['http_url']}/api/v1/status   metrics: {first['http_url']}/metrics")
    prog = command_name()
    trust = ""
    if ca_file is not None:
        print(f"TLS: certificates from a CA made for this run: {ca_file}")
        print(f"  clients trust it with --ca-file {ca_file} (or env SSL_CERT_FILE={ca_file})")
        trust = f" --ca-file {ca_file}"
    print("try, in two more terminals (b listens, a pings and sends):")
    print(
        f"  {prog} keygen --out b.key && {prog} listen --url"
        f" {relays[-1]['http_url']} --key-file b.key{trust}"
    )
    print(
        f"  {prog} keygen --out a.key && {prog} ping --url"
        f" {first['http_url']} --key-file a.key{trust} <b's nodekey>"
    )
    print(
        f"  {prog} send --url {first['http_url']} --key-file a.key{trust} --to <b's nodekey> hello",
    )
    print("Ctrl-C stops the mesh.", flush=True)


def run_up(opts: UpOptions) -> int:
    """Run until Ctrl-C (exit code 130) or SIGTERM (0)."""
    signum = trio.run(_embedded, opts) if opts.etcd == "none" else _processes(opts)
    return 130 if signum == signal.SIGINT else 0


# ---- embedded --------------------------------------------------------------


async def _embedded(opts: UpOptions) -> int:
    if not opts.tls:
        return await _embedded_with(opts, {})
    tls_dir = Path(tempfile.mkdtemp(prefix="relaymesh-up-tls-"))
    try:
        return await _embedded_with(opts, _make_tls(opts, tls_dir))
    finally:
        shutil.rmtree(tls_dir, ignore_errors=True)


async def _embedded_with(opts: UpOptions, tls: dict[str, dict[str, str]]) -> int:
    from coordinator.store import open_memory_store
    from relay.node import ListenError, NodeInfo, serve_relay_node, shut_down_node

    mesh_key = secrets.token_bytes(32)
    # Signals are caught from the start, so a Ctrl-C while relays start stops cleanly.
    # SIGHUP reloads every relay's certificate, as it does for `relaymesh relay`.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        got: list[int] = []
        infos: list[NodeInfo] = []
        async with open_memory_store() as store, trio.open_nursery() as nursery:
            starting = trio.CancelScope()
            stop = trio.Event()

            async def watch() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        for info in infos:
                            if info.tls is not None:
                                info.tls.reload()
                        continue
                    got.append(signum)
                    starting.cancel()
                    stop.set()
                    return

            nursery.start_soon(watch)
            cfgs = []
            with starting:
                for spec in _layout(opts):
                    cfg = load_config(
                        overrides={"relay": {**spec, "listen_host": opts.listen_host}, **tls}
                    )
                    cfgs.append(cfg)
                    try:
                        infos.append(
                            await nursery.start(
                                lambda task_status, cfg=cfg: serve_relay_node(
                                    cfg, store=store, mesh_key=mesh_key, task_status=task_status
                                )
                            )
                        )
                    except ListenError as exc:
                        raise UserError(f"relay {spec['name']}: {exc}") from None
                    except BaseExceptionGroup as group:
                        # Raised in the node's nursery, so grouped; still one line.
                        taken, _ = group.split(ListenError)
                        if taken is None:
                            raise
                        raise UserError(f"relay {spec['name']}: {_leaf(taken)}") from None
                with trio.fail_after(10):
                    for info in infos:
                        assert info.state is not None
                        await info.state.wait_synced()
                _report(
                    opts,
                    "embedded",
                    [_describe(i) for i in infos],
                    [],
                    tls["mesh"]["ca_file"] if tls else None,
                )
            await stop.wait()
            async with trio.open_nursery() as draining:
                for info, cfg in zip(infos, cfgs, strict=False):
                    draining.start_soon(
                        partial(shut_down_node, info, deadline_s=cfg.relay.shutdown_deadline_s)
                    )
            nursery.cancel_scope.cancel()
    return got[0]


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _describe(info: Any) -> dict[str, Any]:
    return {
        "relay_id": info.relay_id,
        "region": info.region,
        "ws_url": info.ws_url,
        "http_url": info.http_url,
        "stun_port": info.stun_port,
        "public_key": str(info.public_key),
    }


# ---- one process per relay ----------------------------------------------------


def _processes(opts: UpOptions) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="relaymesh-up-"))
    relays: list[RelayProc] = []
    etcd: EtcdCluster | None = None
    stop = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = signum

    def on_hangup(signum: int, frame: object) -> None:
        # Each relay process reloads its certificate on SIGHUP.
        for relay in relays:
            if relay.proc.poll() is None:
                relay.proc.send_signal(signal.SIGHUP)

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    old_hup = signal.signal(signal.SIGHUP, on_hangup)
    try:
        if opts.etcd == "auto":
            etcd = start_etcd(workdir / "etcd")
            endpoints = ",".join(etcd.endpoints)
        else:
            endpoints = opts.etcd
        mesh_key_file = write_mesh_key(workdir / "mesh.key")
        config = None
        ca_file = None
        if opts.tls:
            tls = _make_tls(opts, workdir / "tls")
            ca_file = tls["mesh"]["ca_file"]
            config = workdir / "relay.toml"
            config.write_text(
                "".join(
                    f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
                    for section, keys in tls.items()
                )
            )
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
                    log=True,
                    config=config,
                )
            )
        described = []
        for relay in relays:
            try:
                info = relay.wait_started().info
            except RuntimeError:
                raise UserError(f"relay {relay.name}: {_last_error(workdir, relay.name)}") from None
            described.append(
                {
                    "relay_id": info["name"],
                    "region": info["region"],
                    "ws_url": info["ws_url"],
                    "http_url": info["http_url"],
                    "stun_port": info.get("stun_port", 0),
                    "public_key": info["public_key"],
                    "pid": relay.pid,
                }
            )
        _report(opts, "processes", described, endpoints.split(","), ca_file)
        if not opts.json:
            print(f"relay logs: {workdir}/<relay>.log", flush=True)
        while not stop and all(r.proc.poll() is None for r in relays):
            time.sleep(0.2)
        return stop
    finally:
        stop_processes(r.proc for r in relays)
        if etcd is not None:
            etcd.stop_all(kill=False)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)
        shutil.rmtree(workdir, ignore_errors=True)


def _last_error(workdir: Path, name: str) -> str:
    """The one-line error a relay printed before it exited, for ``up`` to repeat."""
    try:
        lines = (workdir / f"{name}.log").read_text().splitlines()
    except OSError:
        lines = []
    errors = [ln.removeprefix("relaymesh: error: ") for ln in lines if "relaymesh: error:" in ln]
    return errors[-1] if errors else "exited at start; " + (lines[-1] if lines else "no output")
