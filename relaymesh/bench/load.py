"""``relaymesh bench --scenario load``: what idle clients and pre-auth floods cost a relay.

One ``relaymesh relay`` process (a lone relay, no etcd), started fresh for
every run so one run's freed memory does not flatter the next, and worker
processes that hold connections to it (``python -m relaymesh.bench.load
ROLE ...``, not part of the user-facing CLI):

- ``clients``: opens N authenticated clients (``concurrency`` handshakes in
  flight at once) and keeps them idle. The relay's resident memory (VmRSS)
  with them, less the empty relay's, divided by N, is the memory per idle
  client; N over the time to connect them all is handshakes/s (one client
  process on the same machine: the figure is the pair's, not the relay's
  alone).
- ``preauth``: opens N TCP connections that each send half an upgrade request
  and wait; whichever the relay closes (over ``limits.max_preauth_connections``
  it refuses or sheds the flood's, and closes each after
  ``handshake_timeout_s``) is opened again at once, as an attacker holding N
  would. The flood comes from 127.0.1.x (200 addresses, for ephemeral ports),
  the timed clients from 127.0.0.1. Meanwhile this process starts a normal
  client's connect every 0.5 s and times each, from TCP connect to the relay's ServerInfo.

Each figure is the median over ``runs`` runs. N thousand connections need
that many file descriptors on each side: the soft RLIMIT_NOFILE of this
process (inherited by the relay and the workers) is raised towards the hard
limit, and a count that cannot fit under it is skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from relay.protocol import wire
from relay.protocol.keys import PrivateKey

from ..procs import RelayProc, spawn_relay, stop_processes
from .relay import percentiles
from .workers import finish, read_json, spawn

__all__ = ["run_load"]

#: Descriptors a relay or a worker needs beside its connections (listeners, etcd, logs).
_FD_MARGIN = 256
#: Connections are spread over this many loopback source addresses (127.0.1.x), so
#: a churning flood does not run one address out of ephemeral ports.
_SOURCES = 200
#: Normal-client connects timed per pre-auth run.
_PROBES = 20
#: One timed connect starts this often: they overlap when connects are slow.
_PROBE_INTERVAL_S = 0.5
#: A connect that takes longer than this is counted as failed.
_PROBE_TIMEOUT_S = 60.0
#: Half an upgrade request: the relay waits for the rest until its handshake deadline.
_PARTIAL_UPGRADE = b"GET /derp HTTP/1.1\r\nHost: relay\r\n"


def _source(i: int) -> tuple[str, int]:
    return (f"127.0.1.{1 + i % _SOURCES}", 0)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


# ---- workers -----------------------------------------------------------------


async def _connect_client(url: str, nursery: trio.Nursery, i: int) -> None:
    """Open one authenticated client whose connection lives as long as ``nursery``."""
    from relay.client import client_handshake
    from relay.wsstream import connect_websocket

    ws = await connect_websocket(
        url,
        subprotocol=wire.SUBPROTOCOL,
        max_message=1 << 20,
        receive_bytes=16 * 1024,
        local_address=_source(i)[0],
    )
    await client_handshake(ws, wire.FrameDecoder(), PrivateKey.generate())
    # Idle: it reads nothing (the relay's keepalives wait in the socket's buffer).
    nursery.start_soon(_hold, ws.stream)


async def _hold(stream: trio.abc.Stream) -> None:
    async with stream:
        await trio.sleep_forever()


async def _clients(args: argparse.Namespace) -> None:
    limit = trio.Semaphore(args.concurrency)
    failed = 0

    async def one(i: int, nursery: trio.Nursery) -> None:
        nonlocal failed
        async with limit:
            try:
                with trio.fail_after(_PROBE_TIMEOUT_S):
                    await _connect_client(args.url, nursery, i)
            except Exception:
                failed += 1

    async with trio.open_nursery() as nursery:
        t0 = time.monotonic()
        async with trio.open_nursery() as starting:
            for i in range(args.count):
                starting.start_soon(one, i, nursery)
        seconds = time.monotonic() - t0
        print(json.dumps({"connected": args.count - failed, "seconds": seconds}), flush=True)
        await _wait_stdin_closed()
        nursery.cancel_scope.cancel()


async def _preauth(args: argparse.Namespace) -> None:
    host, port = _host_port(args.url)
    opened = reopened = errors = 0
    filled = trio.Event()

    async def hold(i: int) -> None:
        nonlocal opened, reopened, errors
        first = True
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port, local_address=_source(i)[0])
            except OSError:
                errors += 1
                await trio.sleep(0.05)
                continue
            async with stream:
                try:
                    await stream.send_all(_PARTIAL_UPGRADE)
                    if first:
                        first = False
                        opened += 1
                        if opened == args.count:
                            filled.set()
                    while await stream.receive_some(4096):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            reopened += 1

    async with trio.open_nursery() as nursery:
        t0 = time.monotonic()
        for i in range(args.count):
            nursery.start_soon(hold, i)
        await filled.wait()
        print(json.dumps({"held": opened, "seconds": time.monotonic() - t0}), flush=True)
        reopened_at_fill = reopened
        t1 = time.monotonic()
        await _wait_stdin_closed()
        print(
            json.dumps(
                {
                    "reopened_per_s": round(
                        (reopened - reopened_at_fill) / (time.monotonic() - t1)
                    ),
                    "connect_errors": errors,
                }
            ),
            flush=True,
        )
        nursery.cancel_scope.cancel()


async def _wait_stdin_closed() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    while await stdin.receive_some(1024):
        pass


# ---- orchestration -------------------------------------------------------------


def _spawn(*argv: str) -> subprocess.Popen[str]:
    return spawn("relaymesh.bench.load", *argv)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _wait_for(what: str, check: Any, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _connect_times(url: str, n: int, interval_s: float = 0.0) -> dict[str, Any]:
    """Connect a normal client ``n`` times, one every ``interval_s`` (so several may be
    in flight at once): how long each took, from TCP connect to the relay's ServerInfo."""
    from relay.client import client_handshake
    from relay.wsstream import connect_websocket

    samples: list[int] = []
    failed: list[str] = []

    async def one() -> None:
        t0 = time.perf_counter_ns()
        try:
            with trio.fail_after(_PROBE_TIMEOUT_S):
                ws = await connect_websocket(
                    url, subprotocol=wire.SUBPROTOCOL, max_message=1 << 20, receive_bytes=16384
                )
                async with ws.stream:
                    await client_handshake(ws, wire.FrameDecoder(), PrivateKey.generate())
                    samples.append(time.perf_counter_ns() - t0)
        except Exception as exc:
            failed.append(type(exc).__name__)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
                await trio.sleep(interval_s)

    trio.run(main)
    return {**percentiles(samples), "failed": len(failed), "failures": sorted(set(failed))}


class _Relay:
    """A fresh lone relay for one run."""

    def __init__(self, workdir: Path) -> None:
        self.proc: RelayProc = spawn_relay(
            workdir, region="bench", name="load", port=0, listen_host="127.0.0.1", log=False
        ).wait_started()

    def clients(self) -> int:
        return int(self.proc.status()["stats"]["clients"])

    def closes(self) -> dict[str, int]:
        return dict(self.proc.status()["stats"]["closes"])

    def alive(self) -> bool:
        return self.proc.proc.poll() is None

    def __enter__(self) -> _Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        stop_processes([self.proc.proc])


def _memory_run(workdir: Path, count: int, concurrency: int) -> dict[str, Any]:
    with _Relay(workdir) as relay:
        url = relay.proc.ws_url
        # One client first, so what the first connection loads (crypto, codecs) is in
        # the empty relay's figure, not spread over the N.
        _connect_times(url, 1)
        _wait_for("the empty relay to settle", lambda: relay.clients() <= 2)
        base_clients = relay.clients()
        time.sleep(1.0)
        base = _rss_bytes(relay.proc.pid)
        holder = _spawn(
            "clients", "--url", url, "--count", str(count), "--concurrency", str(concurrency)
        )
        try:
            got = read_json(holder)
            _wait_for(
                f"{got['connected']} clients in the relay's count",
                lambda: relay.clients() >= base_clients + got["connected"],
            )
            time.sleep(1.0)
            rss = _rss_bytes(relay.proc.pid)
        finally:
            finish(holder, 30)
    return {
        "clients": got["connected"],
        "empty_rss_bytes": base,
        "rss_bytes": rss,
        "bytes_per_client": (rss - base) / max(1, got["connected"]),
        "handshakes_per_s": got["connected"] / got["seconds"],
    }


def _preauth_run(workdir: Path, count: int, probes: int) -> dict[str, Any]:
    with _Relay(workdir) as relay:
        url = relay.proc.ws_url
        flood = _spawn("preauth", "--url", url, "--count", str(count))
        try:
            filled = read_json(flood)
            connect = _connect_times(url, probes, _PROBE_INTERVAL_S)
            alive = relay.alive()
            served_after = _connect_times(url, 1)["n"] == 1 if alive else False
        finally:
            if flood.stdin is not None:
                flood.stdin.close()
            churn = read_json(flood) if flood.poll() is None else {}
            finish(flood, 30)
        closes = relay.closes() if relay.alive() else {}
    return {
        "held": filled["held"],
        "connect_ms": connect,
        "relay_alive": alive,
        "served_after": served_after,
        "preauth_shed": closes.get("preauth_shed", 0),
        "preauth_refused": closes.get("preauth_refused", 0),
        "internal_errors": closes.get("internal_error", 0),
        **churn,
    }


def _raise_nofile(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def run_load(
    *,
    clients: tuple[int, ...] = (1000, 5000, 10000),
    preauth: tuple[int, ...] = (3000, 6000, 10000),
    runs: int = 3,
    concurrency: int = 64,
    probes: int = _PROBES,
) -> dict[str, Any]:
    if runs < 1:
        raise ValueError("--runs must be at least 1")
    nofile = _raise_nofile(max((*clients, *preauth), default=0) + _FD_MARGIN)
    result: dict[str, Any] = {
        "scenario": "load",
        "runs": runs,
        "rlimit_nofile": nofile,
        "cpus": os.cpu_count(),
        "memory": [],
        "preauth": [],
        "skipped": [],
    }
    with tempfile.TemporaryDirectory(prefix="relaymesh-bench-load-") as tmp:
        workdir = Path(tmp)
        for n in clients:
            if n + _FD_MARGIN > nofile:
                result["skipped"].append(f"{n} clients: RLIMIT_NOFILE is {nofile}")
                continue
            rs = [_memory_run(workdir, n, concurrency) for _ in range(runs)]
            result["memory"].append(
                {
                    "clients": n,
                    "bytes_per_client": round(_median([r["bytes_per_client"] for r in rs])),
                    "handshakes_per_s": round(_median([r["handshakes_per_s"] for r in rs])),
                    "empty_rss_bytes": round(_median([r["empty_rss_bytes"] for r in rs])),
                    "per_run": rs,
                }
            )
        for n in preauth:
            if n + _FD_MARGIN > nofile:
                result["skipped"].append(f"{n} pre-auth connections: RLIMIT_NOFILE is {nofile}")
                continue
            rs = [_preauth_run(workdir, n, probes) for _ in range(runs)]
            result["preauth"].append(
                {
                    "held": n,
                    "connect_p50_ms": round(_median([r["connect_ms"]["p50"] for r in rs]), 2),
                    "connect_p99_ms": round(_median([r["connect_ms"]["p99"] for r in rs]), 2),
                    "connect_failed": sum(r["connect_ms"]["failed"] for r in rs),
                    "connects": sum(r["connect_ms"]["n"] for r in rs),
                    "relay_survived": all(r["relay_alive"] and r["served_after"] for r in rs),
                    "per_run": rs,
                }
            )
    return result


def describe(r: dict[str, Any]) -> str:
    lines = [
        f"relaymesh bench --scenario load: median of {r['runs']} run(s), {r['cpus']} cpus,"
        f" RLIMIT_NOFILE raised to {r['rlimit_nofile']}",
        f"{'idle clients':>14}{'KiB/client':>12}{'handshakes/s':>14}{'empty relay MiB':>17}",
    ]
    for m in r["memory"]:
        lines.append(
            f"{m['clients']:>14,}{m['bytes_per_client'] / 1024:>12.1f}{m['handshakes_per_s']:>14,}"
            f"{m['empty_rss_bytes'] / 2**20:>17.1f}"
        )
    lines.append(
        f"{'pre-auth held':>14}{'connect p50 ms':>16}{'p99 ms':>9}{'failed':>9}{'relay up':>10}"
    )
    for p in r["preauth"]:
        lines.append(
            f"{p['held']:>14,}{p['connect_p50_ms']:>16.1f}{p['connect_p99_ms']:>9.1f}"
            f"{p['connect_failed']:>5}/{p['connects'] + p['connect_failed']:<3}"
            f"{'yes' if p['relay_survived'] else 'NO':>10}"
        )
    lines += [f"skipped: {s}" for s in r["skipped"]]
    return "\n".join(lines)


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m relaymesh.bench.load")
    p.add_argument("role", choices=["clients", "preauth"])
    p.add_argument("--url", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args(argv)
    trio.run(_clients if args.role == "clients" else _preauth, args)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
