"""The ``relaymesh`` command.

Every subcommand has ``--help``; ``--json`` where a machine may read the
output; errors are one line on stderr and a non-zero exit (2 for a usage
mistake, 1 for a failure), never a traceback for a user mistake.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from coordinator.store import StoreUnavailable
from relay import __version__
from relay.client import ConnectError, open_relay_client
from relay.config import ConfigError, load_config, load_mesh_key
from relay.node import ListenError, NodeInfo, load_node_key, serve_relay_node, shut_down_node
from relay.protocol.keys import (
    KeyFileError,
    NodeKey,
    PrivateKey,
    Sealer,
    SealError,
    load_key_file,
    write_key_file,
)

from .errors import UserError
from .hints import command_name
from .urls import UrlError, relay_urls, split_urls, url_kind

__all__ = ["main"]

if TYPE_CHECKING:
    _Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def _fail(msg: str, code: int = 1) -> NoReturn:
    print(f"relaymesh: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _load_key(path: Path) -> PrivateKey:
    if not path.exists():
        raise UserError(
            f"{path}: no such key file (create one with: relaymesh keygen --out {path})"
        )
    try:
        return load_key_file(path)
    except KeyFileError as exc:
        raise UserError(str(exc)) from None


def _urls(text: str) -> str:
    try:
        split_urls(text)
    except UrlError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _http_base(args: argparse.Namespace, command: str) -> str:
    """The relay's HTTP base, which serves the region map: ``--url`` itself, or for a
    ``ws://…/derp`` URL the ``http_url`` the relay names in its ServerInfo."""
    url: str = args.url
    if url_kind(url) == "http":
        return url
    from relay.client import ConnectError, open_relay_client

    async def ask() -> Any:
        async with open_relay_client(
            url,
            PrivateKey.generate(),
            token=getattr(args, "token", None),
            ssl_context=_trust(args),
        ) as client:
            return client.server_info.get("http_url")

    base = _run(ask, ConnectError)
    if not isinstance(base, str) or url_kind(base) != "http":
        raise UserError(
            f"{command} needs a relay's HTTP base (http://host:port, the `http` line of"
            f" `relaymesh relay`), which serves the region map; the relay at {url} does"
            " not name one"
        )
    return base


def _run(fn: Callable[[], Awaitable[Any]], *mistakes: type[Exception]) -> Any:
    """trio.run(fn), with ``mistakes`` (grouped or not) turned into the one-line UserError."""
    try:
        return trio.run(fn)
    except mistakes as exc:
        raise UserError(str(exc)) from None
    except BaseExceptionGroup as group:
        found, _ = group.split(mistakes)
        if found is None:
            raise
        raise UserError(str(_first(found))) from None


def _parse_nodekey(text: str) -> NodeKey:
    try:
        return NodeKey.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---- keygen ----------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    key = PrivateKey.generate()
    if args.out is not None:
        try:
            write_key_file(args.out, key)
        except FileExistsError:
            raise UserError(f"{args.out}: already exists; not overwriting a key") from None
        except OSError as exc:
            raise UserError(f"{args.out}: cannot write: {exc.strerror}") from None
    if args.json:
        out: dict[str, Any] = {"public_key": str(key.public)}
        if args.out is None:
            out["private_key"] = key.to_text()
        else:
            out["key_file"] = str(args.out)
        print(json.dumps(out))
    elif args.out is None:
        # No file: the private key must go somewhere, and stdout is what the user asked for.
        print(key.to_text())
        print(key.public, file=sys.stderr)
    else:
        print(key.public)
    return 0


# ---- relay -----------------------------------------------------------------


def cmd_relay(args: argparse.Namespace) -> int:
    overrides = {
        "relay": {
            "region": args.region,
            "name": args.name,
            "port": args.port,
            "http_port": args.http_port,
            "stun_port": args.stun_port,
            "key_file": str(args.key_file) if args.key_file else None,
            "listen_host": args.listen_host,
        },
        "mesh": {
            "etcd_endpoints": args.etcd.split(",") if args.etcd else None,
            "mesh_key_file": str(args.mesh_key_file) if args.mesh_key_file else None,
            "advertise_host": args.advertise_host,
        },
        "public": {"host": args.public_host},
    }
    try:
        cfg = load_config(args.config, overrides=overrides)
        mesh_key = load_mesh_key(cfg.mesh)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if cfg.mesh.etcd_endpoints and mesh_key is None:
        raise UserError(
            "a relay in a mesh needs the mesh key: --mesh-key-file FILE"
            " (or [mesh] mesh_key_file, or env RELAYMESH_MESH_KEY)"
        )

    try:
        key = load_node_key(cfg)
    except OSError as exc:
        raise UserError(
            f"{cfg.relay.key_file}: cannot create the relay key: {exc.strerror or exc}"
        ) from None
    prog = command_name()

    async def run() -> int:
        # Signals are caught from before the first port is bound: a Ctrl-C that lands
        # while the relay starts (or just after its banner) still stops it cleanly.
        # SIGHUP reloads the TLS certificate (relay/tls.py); it never stops the relay.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            got: list[int] = []
            stop = trio.Event()
            node: list[NodeInfo] = []
            async with trio.open_nursery() as nursery:
                starting = trio.CancelScope()

                async def watch() -> None:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            tls = node[0].tls if node else None
                            if tls is not None:
                                tls.reload()
                            continue
                        got.append(signum)
                        starting.cancel()
                        stop.set()
                        return

                nursery.start_soon(watch)
                with starting:
                    info = await _start_node(nursery, cfg, key, mesh_key)
                    node.append(info)
                if not got:
                    _relay_banner(args, info, prog)
                    await stop.wait()
                    log = logging.getLogger("relaymesh")
                    log.info("shutting down: telling clients to move")
                    await shut_down_node(info, deadline_s=cfg.relay.shutdown_deadline_s)
                nursery.cancel_scope.cancel()
        return 130 if got[0] == signal.SIGINT else 0

    return trio.run(run)


async def _start_node(
    nursery: trio.Nursery, cfg: Any, key: PrivateKey, mesh_key: bytes | None
) -> NodeInfo:
    """Start the node; with shared state, return only once it is registered there."""
    try:
        info: NodeInfo = await nursery.start(
            lambda task_status: serve_relay_node(
                cfg, key=key, mesh_key=mesh_key, task_status=task_status
            )
        )
    except (ListenError, ConfigError, StoreUnavailable) as exc:
        raise UserError(str(exc)) from None
    except BaseExceptionGroup as group:
        # Raised inside the node's nursery, so grouped; still the operator's one line.
        mistakes, _ = group.split((ListenError, ConfigError, StoreUnavailable))
        if mistakes is None:
            raise
        raise UserError(str(_first(mistakes))) from None
    state = info.state
    if state is None:
        return info
    where = ",".join(cfg.mesh.etcd_endpoints)
    # Fail fast, never a banner before the relay is in the mesh: a supervisor
    # (systemd, compose, Kubernetes) restarts it once etcd is there.
    with trio.move_on_after(cfg.mesh.start_timeout_s):
        while not state.registered:
            problem = state.degraded or ""
            if problem.startswith("shared state unreachable"):
                raise UserError(f"etcd {where}: {problem.removeprefix('shared state ')}")
            await trio.sleep(0.05)
        return info
    raise UserError(
        f"etcd {where}: not registered within {cfg.mesh.start_timeout_s:g} s"
        f" ({state.degraded or 'no answer'})"
    )


def _relay_banner(args: argparse.Namespace, info: NodeInfo, prog: str) -> None:
    # Clients are told the public address; the mesh address is shown when it differs.
    addr = info.addresses
    ws_url = addr.client_ws_url if addr else info.ws_url
    http_url = addr.client_http_url if addr else info.http_url
    stun = addr.client_stun if addr else None
    if args.json:
        print(
            json.dumps(
                {
                    "region": info.region,
                    "name": info.name,
                    "public_key": str(info.public_key),
                    "ws_url": ws_url,
                    "http_url": http_url,
                    "stun_port": info.stun_port,
                    "stun": stun,
                    "mesh_ws_url": info.ws_url,
                    "mesh_http_url": info.http_url,
                }
            ),
            flush=True,
        )
        return
    print(f"relay {info.region}/{info.name} is up", flush=True)
    print(f"  key       {info.public_key}")
    print(f"  websocket {ws_url}")
    print(f"  http      {http_url}  (/healthz /metrics /api/v1/status /regionmap)")
    print(f"  stun      udp {stun}" if stun else "  stun      off")
    if ws_url != info.ws_url:
        print(f"  mesh      {info.ws_url} {info.http_url}  (relays, monitor, Prometheus)")
    print("connect two terminals through it:")
    print(f"  {prog} keygen --out alice.key; {prog} keygen --out bob.key")
    print(f"  {prog} listen --url {ws_url} --key-file bob.key")
    print(
        f"  {prog} send --url {ws_url} --key-file alice.key --to <bob's key> hello",
        flush=True,
    )


def cmd_up(args: argparse.Namespace) -> int:
    from .up import UpOptions, run_up

    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    if not regions or args.relays_per_region < 1:
        raise UserError("--regions needs at least one region and --relays-per-region at least 1")
    try:
        return run_up(
            UpOptions(
                regions=regions,
                relays_per_region=args.relays_per_region,
                base_port=args.base_port,
                etcd=args.etcd,
                state_file=args.state_file,
                json=args.json,
                listen_host=args.listen_host,
                tls=args.tls,
            )
        )
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot start the mesh: {exc.strerror or exc}") from None


# ---- trust in wss:// and https:// relays -----------------------------------------


def _ca_file_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ca-file",
        type=Path,
        help="verify wss:// and https:// relays with this CA bundle (PEM) instead of the"
        " system's (env SSL_CERT_FILE also works)",
    )


def _trust(args: argparse.Namespace) -> Any:
    from relay.tls import TLSError, client_context

    try:
        return client_context(args.ca_file)
    except TLSError as exc:
        raise UserError(str(exc)) from None


# ---- regionmap / netcheck ------------------------------------------------------


def _verify_key(text: str | None) -> Any:
    if text is None:
        return None
    import nacl.signing

    try:
        return nacl.signing.VerifyKey(bytes.fromhex(text.removeprefix("ed25519:")))
    except (ValueError, TypeError):
        raise UserError("--verify-key must be an Ed25519 public key: 64 hex digits") from None


def cmd_regionmap(args: argparse.Namespace) -> int:
    from relaymesh.home import MapFetchError, RegionMapSource

    url = _http_base(args, "regionmap")
    source = RegionMapSource(url, verify_key=_verify_key(args.verify_key), ssl_context=_trust(args))
    region_map = _run(source.fetch, MapFetchError)
    if args.json:
        print(json.dumps(region_map.model_dump(mode="json")))
        return 0
    print(f"{'region':<8}{'id':>3}  {'relay':<10}{'up':<5}{'websocket':<34}{'stun':<22}key")
    for region in region_map.regions:
        for node in region.nodes:
            stun_addr = node.stun_address()
            stun = f"{stun_addr[0]}:{stun_addr[1]}" if stun_addr else "-"
            key = (node.public_key or "-")[:20] + ("…" if node.public_key else "")
            print(
                f"{region.code:<8}{region.id:>3}  {node.name:<10}{'yes' if node.up else 'NO':<5}"
                f"{node.ws_url:<34}{stun:<22}{key}"
            )
    return 0


def cmd_netcheck(args: argparse.Namespace) -> int:
    from region.netcheck import run_netcheck
    from relaymesh.home import MapFetchError, RegionMapSource

    url = _http_base(args, "netcheck")
    verify_key = _verify_key(args.verify_key)
    trust = _trust(args)

    async def run() -> Any:
        source = RegionMapSource(url, verify_key=verify_key, ssl_context=trust)
        region_map = await source.fetch()
        return await run_netcheck(region_map, deadline_s=args.deadline, ssl_context=trust)

    report = _run(run, MapFetchError)
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    print(
        f"UDP: {'yes' if report.udp else 'no (HTTP latency only)'}"
        f"   public address: {report.global_addr or '-'}"
        f"   NAT maps per destination: "
        f"{'-' if report.mapping_varies_by_dest is None else report.mapping_varies_by_dest}"
    )
    print(f"  {'region':<8}{'relay':<10}{'latency':>10}  via")
    for probe in sorted(report.probes, key=lambda p: (p.best_ms is None, p.best_ms or 0.0)):
        mark = "*" if probe.node == report.preferred_relay else " "
        via = "stun" if probe.stun_ms else ("https" if probe.http_ms is not None else "-")
        ms = f"{probe.best_ms:.1f} ms" if probe.best_ms is not None else "no answer"
        print(f"{mark} {probe.region:<8}{probe.node:<10}{ms:>10}  {via}")
    print(
        f"preferred: {report.preferred_region}/{report.preferred_relay}"
        f"   ({report.duration_ms:.0f} ms)"
    )
    return 0


# ---- listen / send ---------------------------------------------------------


def cmd_ping(args: argparse.Namespace) -> int:
    from relaymesh.home import MapFetchError
    from relaymesh.peer import PeerNotFound, open_peer

    url = _http_base(args, "ping")
    key = _load_key(args.key_file)
    dest: NodeKey = args.node
    trust = _trust(args)

    async def run() -> int:
        answered = 0
        async with open_peer(url, key, token=args.token, ssl_context=trust) as peer:
            for seq in range(args.count):
                if seq:
                    await trio.sleep(args.interval)
                with trio.move_on_after(args.timeout) as scope:
                    rtt, info = await peer.ping(dest)
                if scope.cancelled_caught:
                    line: dict[str, Any] = {"seq": seq, "timeout": True}
                    text = f"timeout waiting for {dest.short()} ({args.timeout:g} s)"
                else:
                    answered += 1
                    line = {
                        "seq": seq,
                        "rtt_ms": round(rtt * 1000, 3),
                        "direct": info.direct,
                        "addr": f"{info.addr[0]}:{info.addr[1]}" if info.addr else None,
                        "relay": info.relay,
                        "region": info.region,
                    }
                    text = f"pong from {dest.short()} {info.describe()} in {rtt * 1000:.1f} ms"
                print(json.dumps(line) if args.json else text, flush=True)
        return 0 if answered else 1

    return int(_run(run, MapFetchError, PeerNotFound))


def cmd_listen(args: argparse.Namespace) -> int:
    from relaymesh.home import MapFetchError

    urls = split_urls(args.url)
    key = _load_key(args.key_file)
    if len(urls) == 1 and url_kind(urls[0]) == "http":
        return _listen_as_peer(args, key)
    sealer = Sealer(key)
    trust = _trust(args)

    async def run() -> None:
        try:
            urls = await relay_urls(args.url, ssl_context=trust)
            async with open_relay_client(urls, key, token=args.token, ssl_context=trust) as client:
                if args.json:
                    print(json.dumps({"listening": str(key.public), "url": client.url}), flush=True)
                else:
                    print(f"listening as {key.public} on {client.url}", flush=True)
                received = 0
                while args.count is None or received < args.count:
                    packet = await client.receive()
                    try:
                        plain = sealer.open(packet.src, packet.payload)
                    except SealError:
                        print(
                            f"relaymesh: dropped a packet from {packet.src} that did not open",
                            file=sys.stderr,
                            flush=True,
                        )
                        continue
                    received += 1
                    if args.json:
                        print(
                            json.dumps(
                                {"from": str(packet.src), "text": plain.decode(errors="replace")}
                            ),
                            flush=True,
                        )
                    else:
                        print(f"{packet.src}: {plain.decode(errors='replace')}", flush=True)
        except (ConnectError, MapFetchError) as exc:
            raise UserError(str(exc)) from None

    trio.run(run)
    return 0


def _listen_as_peer(args: argparse.Namespace, key: PrivateKey) -> int:
    """Listen on the closest relay of a mesh, with direct paths (and answering pings)."""
    from relaymesh.home import MapFetchError
    from relaymesh.peer import open_peer

    trust = _trust(args)

    async def run() -> None:
        async with open_peer(args.url, key, token=args.token, ssl_context=trust) as peer:
            assert peer.home is not None
            where = f"{peer.home.home.region}/{peer.home.home.relay}"
            if args.json:
                print(json.dumps({"listening": str(key.public), "relay": where}), flush=True)
            else:
                print(f"listening as {key.public} on relay {where}", flush=True)
            received = 0
            while args.count is None or received < args.count:
                got = await peer.receive()
                received += 1
                text = got.payload.decode(errors="replace")
                if args.json:
                    print(
                        json.dumps({"from": str(got.src), "text": text, "direct": got.direct}),
                        flush=True,
                    )
                else:
                    print(f"{got.src}: {text}", flush=True)

    _run(run, MapFetchError, ConnectError)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from relaymesh.home import MapFetchError

    key = _load_key(args.key_file)
    sealer = Sealer(key)
    dest: NodeKey = args.to
    try:
        sealer.seal(dest, b"")
    except Exception:
        # libsodium refuses a key that is not a point of the curve (all zeros, say).
        raise UserError(f"--to {dest}: not a usable public key (no shared key with it)") from None
    trust = _trust(args)

    async def run() -> None:
        try:
            urls = await relay_urls(args.url, ssl_context=trust)
            async with open_relay_client(urls, key, token=args.token, ssl_context=trust) as client:
                sent = 0
                if args.message == "-":
                    # One packet per line, sent as it is read, so a terminal works like a chat.
                    stdin = trio.wrap_file(sys.stdin)
                    async for line in stdin:
                        await client.send(dest, sealer.seal(dest, line.rstrip("\n").encode()))
                        sent += 1
                else:
                    await client.send(dest, sealer.seal(dest, args.message.encode()))
                    sent = 1
                with trio.fail_after(10):
                    await client.wait_sent()
                gone = client.peer_gone.get(dest)
                if args.json:
                    print(
                        json.dumps(
                            {
                                "sent": sent,
                                "to": str(dest),
                                "peer_gone": gone.name.lower() if gone is not None else None,
                            }
                        )
                    )
                elif gone is not None:
                    print(
                        f"relaymesh: the relay says {dest} is not connected there", file=sys.stderr
                    )
        except (ConnectError, MapFetchError) as exc:
            raise UserError(str(exc)) from None
        except trio.TooSlowError:
            raise UserError("the relay did not take the packets within 10 s") from None

    trio.run(run)
    return 0


# ---- parser ----------------------------------------------------------------


# ---- status -----------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 when healthy, 1 with an error-severity problem (or stale data), 2 unreachable."""
    from .status import fetch_mesh_status, render_status, status_exit_code

    trust = _trust(args)

    while True:
        doc, error = fetch_mesh_status(args.url, ssl_context=trust)
        if doc is None:
            print(f"relaymesh: error: {args.url}: {error}", file=sys.stderr)
            code = 2
        else:
            code = status_exit_code(doc)
            if args.json:
                print(json.dumps(doc), flush=True)
            else:
                if args.watch:
                    print("\x1b[H\x1b[2J", end="")
                print(render_status(doc), flush=True)
        if not args.watch:
            return code
        # Ctrl-C here, or in the fetch, ends the watch with 130 (main).
        time.sleep(doc["interval_s"] if doc else 2.0)


def _bench(args: argparse.Namespace) -> int:
    from .bench.command import cmd_bench

    if not args.seconds > 0:
        raise UserError(f"--seconds must be more than 0, not {args.seconds:g}")
    if args.pairs < 1:
        raise UserError(f"--pairs must be at least 1, not {args.pairs}")
    if args.runs < 1:
        raise UserError(f"--runs must be at least 1, not {args.runs}")
    return cmd_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relaymesh",
        description="A relay mesh for end-to-end-encrypted packets.",
    )
    parser.add_argument("--version", action="version", version=f"relaymesh {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info for relay, warning otherwise)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_keygen(sub)
    _add_relay(sub)
    _add_up(sub)
    _add_listen_send(sub)
    _add_regionmap_netcheck(sub)
    _add_ping(sub)
    _add_status(sub)
    _add_bench(sub)
    return parser


def _add_keygen(sub: _Commands) -> None:
    p = sub.add_parser("keygen", help="make a new node key", description="Make a new node key.")
    p.add_argument("--out", type=Path, help="write the private key to this new file (mode 0600)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_keygen)


def _add_relay(sub: _Commands) -> None:
    p = sub.add_parser("relay", help="run a relay node", description="Run a relay node.")
    p.add_argument("--config", type=Path, help="TOML config file (see config/relay.example.toml)")
    p.add_argument("--region", help="region id, e.g. eu")
    p.add_argument("--name", help="relay name, unique in the mesh, e.g. eu-1")
    p.add_argument("--listen-host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="WebSocket port (0: any free port)")
    p.add_argument("--http-port", type=int, help="HTTP API port (0: any free port)")
    p.add_argument("--stun-port", type=int, help="STUN port, UDP (0: any free port)")
    p.add_argument("--key-file", type=Path, help="relay private key; created if missing")
    p.add_argument(
        "--etcd",
        metavar="URL[,URL...]",
        help="etcd endpoints of the mesh's shared state (omit: a lone relay)",
    )
    p.add_argument("--mesh-key-file", type=Path, help="file holding the mesh's shared secret")
    p.add_argument("--advertise-host", help="host other relays use to reach this relay")
    p.add_argument(
        "--public-host", help="host clients use to reach this relay, if not --advertise-host"
    )
    p.add_argument("--json", action="store_true", help="print the relay's URLs as JSON")
    p.set_defaults(func=cmd_relay, default_log="info")


def _add_up(sub: _Commands) -> None:
    p = sub.add_parser(
        "up",
        help="run a whole local multi-region mesh",
        description="Run a multi-region mesh on this machine: embedded (one"
        " process, shared state in memory) or one process per relay"
        " sharing an etcd.",
    )
    p.add_argument(
        "--regions", default="eu,us,ap", help="comma-separated region ids (default eu,us,ap)"
    )
    p.add_argument("--relays-per-region", type=int, default=2, help="default 2")
    p.add_argument(
        "--base-port",
        type=int,
        default=3340,
        help="first port; relay i gets base+2i (WebSocket, TCP), base+2i+1 (HTTP, TCP)"
        " and base+138+i (STUN, UDP: 3478 and up for the default base);"
        " 0: any free ports (default 3340)",
    )
    p.add_argument(
        "--etcd",
        default="none",
        metavar="none|auto|URL[,URL...]",
        help="none: embedded (default); auto: start a local etcd, one process per"
        " relay; URL: use that etcd, one process per relay",
    )
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument(
        "--tls",
        action="store_true",
        help="serve wss:// and https:// with a CA made for this run (its file is printed)",
    )
    p.add_argument("--state-file", type=Path, help="also write the relays' URLs here as JSON")
    p.add_argument("--json", action="store_true", help="print the relays' URLs as JSON")
    p.set_defaults(func=cmd_up, default_log="warning")


def _add_listen_send(sub: _Commands) -> None:
    for name, func, helptext in (
        ("listen", cmd_listen, "print the packets that arrive for a key"),
        ("send", cmd_send, "send a message to a node key"),
    ):
        p = sub.add_parser(
            name, help=helptext, description=helptext[0].upper() + helptext[1:] + "."
        )
        p.add_argument(
            "--url",
            required=True,
            type=_urls,
            help="a relay's WebSocket URL (ws://…/derp) or its HTTP base (http://…: any"
            " relay of its region map, that one first, so the client moves to a sibling"
            " when it restarts); several, comma-separated, are tried in order."
            + (
                " listen with one HTTP base joins the mesh as a peer: closest relay,"
                " direct paths, answers ping"
                if name == "listen"
                else ""
            ),
        )
        p.add_argument("--key-file", type=Path, required=True, help="your private key file")
        p.add_argument("--token", help="admission token, if the relay asks for one")
        _ca_file_option(p)
        p.add_argument("--json", action="store_true", help="print JSON lines")
        if name == "listen":
            p.add_argument("--count", type=int, help="exit after this many messages")
        else:
            p.add_argument(
                "--to",
                type=_parse_nodekey,
                required=True,
                metavar="NODEKEY",
                help="the recipient's public key (nodekey:...)",
            )
            p.add_argument("message", help="the message, or - to send each line of stdin")
        p.set_defaults(func=func)


def _add_regionmap_netcheck(sub: _Commands) -> None:
    for name, func, helptext in (
        ("regionmap", cmd_regionmap, "show a relay's region map"),
        ("netcheck", cmd_netcheck, "measure the latency to every region"),
    ):
        p = sub.add_parser(
            name, help=helptext, description=helptext[0].upper() + helptext[1:] + "."
        )
        p.add_argument(
            "--url",
            required=True,
            help="a relay's HTTP base, e.g. http://127.0.0.1:3341 (it serves the region map)",
        )
        p.add_argument("--verify-key", help="refuse a map not signed by this Ed25519 key (hex)")
        _ca_file_option(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        if name == "netcheck":
            p.add_argument("--deadline", type=float, default=3.0, help="seconds for all probes")
        p.set_defaults(func=func)


def _add_ping(sub: _Commands) -> None:
    p = sub.add_parser(
        "ping",
        help="round trips to a peer, relayed or direct",
        description="Ping a peer through the mesh: each line says whether the"
        " round trip went via a relay or directly, and how long it took."
        " The peer answers if it runs `relaymesh listen --url HTTP_URL`"
        " (or any open_peer()).",
    )
    p.add_argument("--url", required=True, help="a relay's HTTP URL (its region map)")
    p.add_argument("--key-file", type=Path, required=True, help="your private key file")
    p.add_argument("node", type=_parse_nodekey, metavar="NODEKEY", help="the peer to ping")
    p.add_argument("--token", help="admission token, if the relays ask for one")
    p.add_argument("--count", type=int, default=5, help="pings to send (default 5)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between pings")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for each pong")
    _ca_file_option(p)
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(func=cmd_ping)


def _add_status(sub: _Commands) -> None:
    p = sub.add_parser(
        "status",
        help="the mesh's health, problems first",
        description="Show the whole mesh's health as a relay sees it (its /api/v1/mesh):"
        " problems first, then relays, paths and etcd. Exit status: 0 healthy,"
        " 1 a problem of severity error (or stale data), 2 the relay cannot be reached.",
    )
    p.add_argument("--url", required=True, help="a relay's HTTP URL, e.g. http://127.0.0.1:3341")
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.add_argument(
        "--watch", action="store_true", help="redraw every interval until Ctrl-C (exit status 130)"
    )
    _ca_file_option(p)
    p.set_defaults(func=cmd_status)


def _add_bench(sub: _Commands) -> None:
    from .bench.command import SCENARIOS

    p = sub.add_parser(
        "bench",
        help="measure the relay against bare byte-copy relays",
        description="Measure packets/s, MB/s, loss, CPU and latency through a relay process,"
        " and the same for two bare relays that copy bytes (over TCP, and WebSocket"
        " message by message), in the same run; each figure --runs times.",
    )
    p.add_argument(
        "--size",
        type=int,
        action="append",
        help="packet payload bytes; repeat for several (default: 1200 and 65536;"
        " 1200 for --scenario mesh)",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per throughput run")
    p.add_argument("--runs", type=int, default=5, help="runs of each figure (default 5)")
    p.add_argument("--pairs", type=int, default=1, help="sender/receiver pairs")
    p.add_argument("--no-baseline", action="store_true", help="skip the byte-copy relays")
    p.add_argument(
        "--scenario",
        default="relay",
        choices=list(SCENARIOS),
        help="; ".join(f"{name}: {s.help}" for name, s in SCENARIOS.items())
        + " (default relay). The mesh scenarios need the etcd binary.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level or getattr(args, "default_log", "warning"))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (UserError, UrlError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _stdout_gone()
    except BaseExceptionGroup as group:
        # Errors raised inside a nursery arrive grouped; a user mistake is still one
        # line, Ctrl-C is still 130, and a reader that went away is still quiet.
        if group.split(KeyboardInterrupt)[0] is not None:
            return 130
        users, _ = group.split((UserError, UrlError))
        if users is not None:
            _fail(str(_first(users)))
        if group.split(BrokenPipeError)[0] is not None:
            return _stdout_gone()
        raise


def _stdout_gone() -> int:
    """``relaymesh netcheck --json | head``: the reader left; exit quietly, as cat does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def _first(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
