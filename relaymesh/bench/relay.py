"""``relaymesh bench``: packets/s, MB/s and one-hop latency through a relay.

Everything runs in separate processes so both cores work: one relay process,
and a receiver and a sender process per pair. The same client code measures
three relays in the same invocation, one after the other in each run:

- ``relay``: relaymesh's RelayServer, clients speak the real protocol over
  WebSocket (handshake, framing, coalescing);
- ``tcp_copy``: a bare trio relay that pairs two TCP sockets and copies bytes
  from one to the other without parsing: the ceiling for any trio relay here.
  The clients send the same frames over plain TCP;
- ``ws_copy``: a trio-websocket relay that pairs two WebSocket connections and
  forwards each message as it came, without parsing it: the ceiling for a
  relay whose clients speak WebSocket with this stack (trio-websocket, wsproto,
  the same C masking as the relay).

Each target gets a throughput run (the sender sends as fast as the path
takes, for ``--seconds``) and then a latency run at ~10% of the throughput
measured, where every packet carries its send time (CLOCK_MONOTONIC is one
clock for all processes on the machine). Senders connect first and start
together on a "go" line; CPU is read from /proc/<pid>/stat over the steady
window only: from a short warm-up after "go" to the moment the senders stop,
so process start-up and the drain are not in the divisor.

Packet payload: phase (u8) | sequence (u64) | send time ns (u64) | padding.

The worker roles are run as ``python -m relaymesh.bench.relay ROLE ...``; they are not
part of the user-facing CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from relay.protocol import wire
from relay.protocol.keys import PrivateKey

from .workers import finish, read_json, spawn

__all__ = [
    "TARGETS",
    "check_size",
    "percentiles",
    "ratio",
    "run_bench",
    "spread",
    "stream",
    "summarize",
]

_HDR = struct.Struct(">BI")
_PAY = struct.Struct(">BQQ")
_K = wire.KEY_BYTES
_MIN_SIZE = _PAY.size
_RECV = int(wire.FrameType.RECV_PACKET)
_SEND = int(wire.FrameType.SEND_PACKET)
_BATCH_BYTES = int(os.environ.get("RELAYMESH_BENCH_BATCH", 64 * 1024))


# ---- transports: the same client code over WebSocket or raw TCP ------------


class _Transport:
    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def receive(self) -> bytes:
        raise NotImplementedError


class _WsTransport(_Transport):
    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def receive(self) -> bytes:
        return bytes(await self.ws.receive())


class _TcpTransport(_Transport):
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> bytes:
        data = await self.stream.receive_some(256 * 1024)
        if not data:
            raise EOFError
        return bytes(data)


async def _with_transport(args: argparse.Namespace, key: PrivateKey, role: str, body: Any) -> None:
    if args.target in ("relay", "ws_copy"):
        from relay.client import client_handshake
        from relay.wsstream import connect_websocket

        relay = args.target == "relay"
        # The same WebSocket client as the SDK's (relay/wsstream.py).
        ws = await connect_websocket(
            args.url if relay else f"{args.url}/{role}/{args.pair}",
            subprotocol=wire.SUBPROTOCOL if relay else None,
            receive_bytes=256 * 1024,
            max_message=4 * 1024 * 1024,
        )
        try:
            if relay:
                decoder = wire.FrameDecoder()
                await client_handshake(ws, decoder, key)
                await _ping(ws, decoder)
            await body(_WsTransport(ws))
        finally:
            with trio.move_on_after(1):
                await ws.aclose(1000)
    else:
        stream = await trio.open_tcp_stream("127.0.0.1", args.port)
        async with stream:
            await stream.send_all(f"{role} {args.pair}\n".encode())
            await body(_TcpTransport(stream))


async def _ping(ws: Any, decoder: wire.FrameDecoder) -> None:
    """Ping the relay and wait for its Pong.

    The relay raises a connection's message size limit from the handshake's
    to the data path's after it has sent ServerInfo; a 64 KiB batch sent at
    once can reach it before that and be closed as too big (1009). The Pong
    comes from the relay's read loop, which starts after the raise.
    """
    data = os.urandom(wire.PING_BYTES)
    await ws.send_message(wire.encode(wire.Ping(data=data)))
    while True:
        event = decoder.next_event()
        if isinstance(event, wire.NeedData):
            decoder.receive_data(await ws.get_message())
        elif event == wire.Pong(data=data):
            return


# ---- receiver --------------------------------------------------------------


@dataclass
class _PhaseStats:
    count: int = 0
    payload_bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0
    max_seq: int = -1
    reordered: int = 0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


async def _receiver(args: argparse.Namespace) -> None:
    key = PrivateKey.generate()
    tput = _PhaseStats()
    lat_ns: list[int] = []
    lat_stats = _PhaseStats()

    async def body(t: _Transport) -> None:
        print(json.dumps({"key": key.public.raw.hex()}), flush=True)

        async def read() -> None:
            buf = bytearray()
            unpack_hdr = _HDR.unpack_from
            unpack_pay = _PAY.unpack_from
            clock = time.monotonic_ns
            while True:
                buf += await t.receive()
                now = clock()
                pos = 0
                end = len(buf)
                while end - pos >= 5:
                    ftype, length = unpack_hdr(buf, pos)
                    if end - pos - 5 < length:
                        break
                    if (ftype in (_RECV, _SEND)) and length >= _K + _MIN_SIZE:
                        phase, seq, sent_ns = unpack_pay(buf, pos + 5 + _K)
                        st = tput if phase == 1 else lat_stats
                        if st.count == 0:
                            st.first_ns = now
                        st.count += 1
                        st.payload_bytes += length - _K
                        st.last_ns = now
                        if seq < st.max_seq:
                            st.reordered += 1
                        else:
                            st.max_seq = seq
                        if phase == 2:
                            lat_ns.append(now - sent_ns)
                    pos += 5 + length
                del buf[:pos]

        async def control() -> None:
            stdin = trio.lowlevel.FdStream(os.dup(0))
            pending = b""
            while True:
                data = await stdin.receive_some(1024)
                if not data:
                    nursery.cancel_scope.cancel()
                    return
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    which = line.decode().strip()
                    st = tput if which == "tput" else lat_stats
                    out: dict[str, Any] = {
                        "count": st.count,
                        "payload_bytes": st.payload_bytes,
                        "duration_s": max(st.last_ns - st.first_ns, 1) / 1e9,
                        "max_seq": st.max_seq,
                        "reordered": st.reordered,
                    }
                    out["cpu_s"] = _own_cpu()
                    if which == "latency":
                        out["latency_ms"] = percentiles(lat_ns)
                        lat_ns.clear()
                    print(json.dumps(out), flush=True)
                    st.reset()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(control)

    await _with_transport(args, key, "recv", body)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    xs = sorted(samples_ns)
    n = len(xs)
    return {
        "p50": xs[n // 2] / 1e6,
        "p99": xs[min(n - 1, (n * 99) // 100)] / 1e6,
        "max": xs[-1] / 1e6,
        "mean": statistics.fmean(xs) / 1e6,
        "n": n,
    }


# ---- sender ----------------------------------------------------------------


async def _sender(args: argparse.Namespace) -> None:
    key = PrivateKey.generate()
    dest = bytes.fromhex(args.dest)
    size = args.size
    frame_len = 5 + _K + size
    header = _HDR.pack(_SEND, _K + size) + dest
    pad = bytes(size - _MIN_SIZE)
    phase = 1 if args.rate == 0 else 2

    async def body(t: _Transport) -> None:
        # Connected (and past the handshake): wait for the others, then start together.
        print(json.dumps({"ready": True}), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        await stdin.receive_some(64)
        sent = 0
        clock = time.monotonic_ns
        deadline = clock() + int(args.seconds * 1e9)
        per_batch = max(1, _BATCH_BYTES // frame_len)
        if args.rate == 0:
            # As fast as the path takes: TCP backpressure is the only brake.
            batch = bytearray(header + bytes(size)) * per_batch
            offsets = [i * frame_len + 5 + _K for i in range(per_batch)]
            pack = _PAY.pack_into
            while clock() < deadline:
                now = clock()
                for off in offsets:
                    pack(batch, off, phase, sent, now)
                    sent += 1
                await t.send(bytes(batch))
        else:
            start = clock()
            interval_s = 0.0005
            while (now := clock()) < deadline:
                due = int((now - start) * args.rate / 1e9) - sent
                if due > 0:
                    frames = []
                    for _ in range(due):
                        frames.append(header + _PAY.pack(phase, sent, clock()) + pad)
                        sent += 1
                    # After a stall (a loaded machine) many are due at once: a message
                    # over the relay's limit would be closed with 1009.
                    for i in range(0, len(frames), per_batch):
                        await t.send(b"".join(frames[i : i + per_batch]))
                await trio.sleep(interval_s)
        # The end of the steady window; then let the last batch drain before closing.
        print(json.dumps({"sent": sent}), flush=True)
        await trio.sleep(0.3)

    await _with_transport(args, key, "send", body)


# ---- the relays under test -------------------------------------------------


async def _relay(args: argparse.Namespace) -> None:
    from relay.config import load_config
    from relay.server import RelayServer

    cfg = load_config(
        overrides={
            "relay": {"port": 0},
            "limits": {
                "send_queue_packets": args.queue,
                # The queue is bounded by --queue alone, whatever the packet size.
                "send_queue_bytes": args.queue * (wire.MAX_PACKET_BYTES + 64),
                "total_queue_bytes": 16 * 1024**3,
                **json.loads(os.environ.get("RELAYMESH_BENCH_LIMITS", "{}")),
            },
        }
    )
    server = RelayServer(cfg, PrivateKey.generate())

    def report() -> dict[str, Any]:
        stats = server.statistics()
        return {
            "drops": stats.drops,
            "messages_out": stats.messages_out,
            "packets_out": stats.packets_out,
        }

    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        print(json.dumps({"port": port}), flush=True)
        await _answer_stdin(report)
        nursery.cancel_scope.cancel()


class _Pairs:
    """Where a sender's copier finds its pair's receiver, once the receiver is there."""

    def __init__(self) -> None:
        self._receivers: dict[str, Any] = {}
        self._arrived: dict[str, trio.Event] = {}

    def add_receiver(self, pair: str, receiver: Any) -> None:
        self._receivers[pair] = receiver
        self._arrived.setdefault(pair, trio.Event()).set()

    async def receiver(self, pair: str) -> Any:
        await self._arrived.setdefault(pair, trio.Event()).wait()
        return self._receivers[pair]


async def _tcp_copy(args: argparse.Namespace) -> None:
    pairs = _Pairs()

    async def handle(stream: trio.SocketStream) -> None:
        line = b""
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(1)
            if not chunk:
                return
            line += chunk
        role, pair = line.decode().split()
        if role == "recv":
            pairs.add_receiver(pair, stream)
            await trio.sleep_forever()  # the sender's task copies into us
        dest = await pairs.receiver(pair)
        while True:
            data = await stream.receive_some(256 * 1024)
            if not data:
                return
            await dest.send_all(data)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        print(json.dumps({"port": listeners[0].socket.getsockname()[1]}), flush=True)
        await _answer_stdin(dict)
        nursery.cancel_scope.cancel()


async def _ws_copy(args: argparse.Namespace) -> None:
    """A relay that pairs WebSocket connections and copies what one sends to the other,
    with the relay's own WebSocket path (relay/wsstream.py) and receive buffer: what
    that path costs before the relay does any work of its own."""
    from wsproto import ConnectionType
    from wsproto.handshake import H11Handshake

    from relay.config import LimitsConfig
    from relay.wsstream import (
        WebSocketClosed,
        WebSocketStream,
        accept_upgrade,
        read_upgrade_request,
    )

    lim = LimitsConfig()
    pairs = _Pairs()

    async def handle(stream: trio.SocketStream) -> None:
        handshake = H11Handshake(ConnectionType.SERVER)
        request = await read_upgrade_request(stream, handshake, lim.receive_buffer_bytes)
        ws = WebSocketStream(
            stream,
            server_side=True,
            max_message=lim.max_receive_message_bytes,
            receive_bytes=lim.receive_buffer_bytes,
            leftover=await accept_upgrade(stream, handshake, None),
        )
        _, role, pair = request.target.split("/")
        if role == "recv":
            pairs.add_receiver(pair, ws)
            await trio.sleep_forever()  # the sender's task forwards into us
        dest = await pairs.receiver(pair)
        try:
            while True:
                await dest.send(await ws.receive())
        except (WebSocketClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        print(json.dumps({"port": listeners[0].socket.getsockname()[1]}), flush=True)
        await _answer_stdin(dict)
        nursery.cancel_scope.cancel()


async def _answer_stdin(report: Any) -> None:
    """Print ``report()`` as JSON for every line on stdin; return at EOF."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    pending = b""
    while data := await stdin.receive_some(1024):
        pending += data
        while b"\n" in pending:
            _, pending = pending.split(b"\n", 1)
            print(json.dumps(report()), flush=True)


# ---- orchestration ---------------------------------------------------------

#: The targets of the plain bench, in the order each run measures them.
TARGETS = {
    "relay": "relaymesh relay",
    "tcp_copy": "TCP byte copy",
    "ws_copy": "WebSocket byte copy",
}
#: The figures each target's runs are summarised by (min, median, max).
SUMMARY_FIELDS = ("pps", "mbps", "loss_pct", "server_cpu_pct", "p50_ms", "p99_ms")


def _spawn(*argv: str) -> subprocess.Popen[str]:
    return spawn("relaymesh.bench.relay", *argv)


def _tell(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(what + "\n")
    proc.stdin.flush()


def _ask(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    _tell(proc, what)
    return read_json(proc)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(target: str, size: int, seconds: float, pairs: int, queue: int) -> dict[str, Any]:
    role = {"relay": "relay", "tcp_copy": "tcp-copy", "ws_copy": "ws-copy"}[target]
    server = _spawn(role, "--queue", str(queue))
    try:
        port = read_json(server)["port"]
        where = {
            "relay": ["--url", f"ws://127.0.0.1:{port}/derp"],
            "ws_copy": ["--url", f"ws://127.0.0.1:{port}"],
            "tcp_copy": ["--port", str(port)],
        }[target]
        common = ["--target", target, *where, "--size", str(size)]
        drops = (lambda: _ask(server, "stats")["drops"]) if target == "relay" else None
        result = stream(common, common, seconds, pairs, [server.pid], drops=drops)
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=10)
        return result
    finally:
        if server.poll() is None:
            server.kill()


def _pct(part: float, whole: float) -> float:
    return round(100 * part / whole, 1) if whole else 0.0


def stream(
    send_args: list[str],
    recv_args: list[str],
    seconds: float,
    pairs: int,
    server_pids: list[int],
    *,
    before_send: Any = None,
    drops: Any = None,
) -> dict[str, Any]:
    """A throughput run then a latency run at ~10% of it, through servers already up.

    ``drops``, if given, returns the servers' cumulative drop counters by reason;
    the run reports what it added during the throughput run.
    """
    receivers = [_spawn("receiver", *recv_args, "--pair", str(i)) for i in range(pairs)]
    try:
        keys = [read_json(r)["key"] for r in receivers]
        if before_send is not None:
            before_send(keys)

        def run_senders(rate: float, secs: float) -> tuple[int, dict[str, Any]]:
            """Senders at ``rate`` (0: as fast as they can): sent, CPU % over the steady window."""
            senders = [
                _spawn(
                    "sender",
                    *send_args,
                    "--pair",
                    str(i),
                    "--dest",
                    keys[i],
                    "--seconds",
                    str(secs),
                    "--rate",
                    str(rate),
                )
                for i in range(pairs)
            ]
            try:
                for s in senders:
                    read_json(s)  # connected, waiting for "go"
                for s in senders:
                    _tell(s, "go")
                # The steady window starts after a warm-up and ends when the senders stop.
                time.sleep(min(1.0, secs * 0.2))
                groups = {
                    "server": server_pids,
                    "senders": [s.pid for s in senders],
                    "receivers": [r.pid for r in receivers],
                }
                pids = [p for g in groups.values() for p in g]
                cpu0 = {p: _cpu_seconds(p) for p in pids}
                t0 = time.monotonic()
                outs = [read_json(s) for s in senders]
                t1 = time.monotonic()
                cpu1 = {p: _cpu_seconds(p) for p in pids}
                for s in senders:
                    s.wait(timeout=30)
            finally:
                for s in senders:
                    if s.poll() is None:
                        s.kill()
            window = max(t1 - t0, 1e-3)
            cpu = {
                f"{g}_cpu_pct": _pct(sum(cpu1[p] - cpu0[p] for p in ps), window)
                for g, ps in groups.items()
            }
            cpu["server_cpu_pct_each"] = [_pct(cpu1[p] - cpu0[p], window) for p in server_pids]  # type: ignore[assignment]
            cpu["steady_s"] = round(window, 3)
            return sum(int(o["sent"]) for o in outs), cpu

        drops0 = drops() if drops is not None else {}
        sent, cpu = run_senders(0, seconds)
        time.sleep(0.2)
        reports = [_ask(r, "tput") for r in receivers]
        drops1 = drops() if drops is not None else {}
        received = sum(r["count"] for r in reports)
        duration = max(r["duration_s"] for r in reports)
        pps = received / duration
        mbps = sum(r["payload_bytes"] for r in reports) / duration / 1e6
        reordered = sum(r["reordered"] for r in reports)

        lat_pps = max(100.0, pps * 0.10)
        lat_seconds = max(1.0, min(3.0, seconds / 2))
        lat_sent, _ = run_senders(lat_pps / pairs, lat_seconds)
        time.sleep(0.2)
        lat_reports = [_ask(r, "latency") for r in receivers]
        lat = lat_reports[0]["latency_ms"]
        lat_received = sum(r["count"] for r in lat_reports)
        result: dict[str, Any] = {
            "pps": round(pps),
            "mbps": round(mbps, 1),
            "sent": sent,
            "received": received,
            "loss_pct": round(100 * (1 - received / sent), 3) if sent else 0.0,
            "reordered": reordered,
            **cpu,
            "latency_load_pps": round(lat_pps),
            "latency_sent": lat_sent,
            "latency_received": lat_received,
            "p50_ms": round(lat["p50"], 3),
            "p99_ms": round(lat["p99"], 3),
            "max_ms": round(lat["max"], 3),
        }
        if drops is not None:
            result["drops"] = {
                k: v - drops0.get(k, 0) for k, v in drops1.items() if v - drops0.get(k, 0)
            }
        return result
    finally:
        for r in receivers:
            if r.stdin is not None and not r.stdin.closed:
                r.stdin.close()  # all stop at once, then each is waited for
        for r in receivers:
            finish(r)


def spread(values: list[float]) -> dict[str, float]:
    """min, median and max of one figure over the runs."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(
    runs: list[dict[str, Any]], fields: tuple[str, ...] = SUMMARY_FIELDS
) -> dict[str, Any]:
    return {f: spread([r[f] for r in runs]) for f in fields}


def ratio(part: list[dict[str, Any]], whole: list[dict[str, Any]]) -> dict[str, Any]:
    """``part``'s packets/s as a % of ``whole``'s: per run (same run), and of the medians."""
    per_run = [_pct(p["pps"], w["pps"]) for p, w in zip(part, whole, strict=True)]
    return {
        "per_run": per_run,
        **spread(per_run),
        "of_medians": _pct(
            statistics.median(r["pps"] for r in part), statistics.median(r["pps"] for r in whole)
        ),
    }


def check_size(size: int) -> None:
    if size < _MIN_SIZE or size > wire.MAX_PACKET_BYTES:
        raise ValueError(f"--size must be between {_MIN_SIZE} and {wire.MAX_PACKET_BYTES}")


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_bench(
    *,
    sizes: list[int],
    seconds: float,
    runs: int = 5,
    pairs: int = 1,
    ceilings: bool = True,
    queue: int = 4096,
    progress: bool = True,
) -> dict[str, Any]:
    """Each size: ``runs`` runs, each measuring the relay and then (``ceilings``) both copies."""
    for size in sizes:
        check_size(size)
    targets = list(TARGETS) if ceilings else ["relay"]
    result: dict[str, Any] = {
        "scenario": "relay",
        "seconds": seconds,
        "runs": runs,
        "pairs": pairs,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d"),
        "sizes": [],
    }
    for size in sizes:
        measured: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
        for i in range(runs):
            for t in targets:
                r = _measure(t, size, seconds, pairs, queue)
                measured[t].append(r)
                if progress:
                    _note(
                        f"{size} B, run {i + 1}/{runs}, {TARGETS[t]}: {r['pps']:,} packets/s,"
                        f" loss {r['loss_pct']}%, cpu {r['server_cpu_pct']}%"
                    )
        entry: dict[str, Any] = {
            "size": size,
            "targets": {
                t: {"name": TARGETS[t], "runs": rs, "summary": summarize(rs)}
                for t, rs in measured.items()
            },
        }
        if ceilings:
            entry["relay_vs"] = {
                c: ratio(measured["relay"], measured[c]) for c in targets if c != "relay"
            }
        result["sizes"].append(entry)
    return result


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m relaymesh.bench.relay")
    p.add_argument("role", choices=["relay", "tcp-copy", "ws-copy", "receiver", "sender"])
    p.add_argument("--target", choices=list(TARGETS), default="relay")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--url", default="")
    p.add_argument("--pair", default="0")
    p.add_argument("--size", type=int, default=1200)
    p.add_argument("--dest", default="")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--queue", type=int, default=4096)
    args = p.parse_args(argv)
    role = {
        "relay": _relay,
        "tcp-copy": _tcp_copy,
        "ws-copy": _ws_copy,
        "receiver": _receiver,
        "sender": _sender,
    }
    trio.run(role[args.role], args)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
