"""``relaymesh bench``: packets/s, MB/s and one-hop latency through a relay.

Everything runs in separate processes so both cores work: one relay process,
and a receiver and a sender process per pair. The same client code measures
two relays in the same invocation:

- ``relay``: relaymesh's RelayServer, clients speak the real protocol over
  WebSocket (handshake, framing, coalescing);
- ``baseline``: a bare trio relay that pairs two TCP sockets and copies bytes
  from one to the other without parsing: the ceiling for any trio relay here.
  The clients send the same frames over plain TCP.

Each target gets a throughput run (the sender sends as fast as the path
takes, for ``--seconds``) and then a latency run at ~10% of the throughput
measured, where every packet carries its send time (CLOCK_MONOTONIC is one
clock for all processes on the machine).

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

__all__ = ["percentiles", "run_bench", "stream"]

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
        await self.ws.send_message(data)

    async def receive(self) -> bytes:
        msg = await self.ws.get_message()
        return msg if isinstance(msg, bytes) else msg.encode()


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
    if args.target == "relay":
        from trio_websocket import open_websocket_url

        from relay.client import client_handshake

        async with open_websocket_url(
            args.url,
            subprotocols=[wire.SUBPROTOCOL],
            receive_buffer_size=256 * 1024,
            max_message_size=4 * 1024 * 1024,
        ) as ws:
            await client_handshake(ws, wire.FrameDecoder(), key)
            await body(_WsTransport(ws))
    else:
        stream = await trio.open_tcp_stream("127.0.0.1", args.port)
        async with stream:
            await stream.send_all(f"{role} {args.pair}\n".encode())
            await body(_TcpTransport(stream))


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
                    await t.send(b"".join(frames))
                await trio.sleep(interval_s)
        # Let the last batch drain before the connection closes.
        await trio.sleep(0.3)
        print(json.dumps({"sent": sent, "cpu_s": _own_cpu()}), flush=True)

    await _with_transport(args, key, "send", body)


# ---- the two relays under test --------------------------------------------


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
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        print(json.dumps({"port": port}), flush=True)
        await _wait_stdin_closed()
        stats = server.statistics()
        print(
            json.dumps(
                {
                    "drops": stats.drops,
                    "messages_out": stats.messages_out,
                    "packets_out": stats.packets_out,
                }
            ),
            flush=True,
        )
        nursery.cancel_scope.cancel()


async def _baseline(args: argparse.Namespace) -> None:
    waiting: dict[str, dict[str, trio.SocketStream]] = {}

    async def handle(stream: trio.SocketStream) -> None:
        line = b""
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(1)
            if not chunk:
                return
            line += chunk
        role, pair = line.decode().split()
        waiting.setdefault(pair, {})[role] = stream
        if role == "recv":
            await trio.sleep_forever()  # the sender's task copies into us
        while "recv" not in waiting[pair]:  # noqa: ASYNC110 - once per pair, at start
            await trio.sleep(0.01)
        dest = waiting[pair]["recv"]
        while True:
            data = await stream.receive_some(256 * 1024)
            if not data:
                return
            await dest.send_all(data)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        print(json.dumps({"port": listeners[0].socket.getsockname()[1]}), flush=True)
        await _wait_stdin_closed()
        print(json.dumps({}), flush=True)
        nursery.cancel_scope.cancel()


async def _wait_stdin_closed() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    while await stdin.receive_some(1024):
        pass


# ---- orchestration ---------------------------------------------------------


def _spawn(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "relaymesh.bench.relay", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _readjson(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"bench worker {proc.args!r} exited ({proc.wait()})")
    result: dict[str, Any] = json.loads(line)
    return result


def _ask(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    assert proc.stdin is not None
    proc.stdin.write(what + "\n")
    proc.stdin.flush()
    return _readjson(proc)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(target: str, size: int, seconds: float, pairs: int, queue: int) -> dict[str, Any]:
    server = _spawn("relay" if target == "relay" else "baseline", "--queue", str(queue))
    try:
        port = _readjson(server)["port"]
        where = (
            ["--url", f"ws://127.0.0.1:{port}/derp"] if target == "relay" else ["--port", str(port)]
        )
        common = ["--target", target, *where, "--size", str(size)]
        result = stream(common, common, seconds, pairs, [server.pid])
        assert server.stdin is not None
        server.stdin.close()
        extra = _readjson(server)
        server.wait(timeout=10)
        if target == "relay":
            result["relay_drops"] = extra["drops"]
            result["messages_out"] = extra["messages_out"]
        return result
    finally:
        if server.poll() is None:
            server.kill()


def stream(
    send_args: list[str],
    recv_args: list[str],
    seconds: float,
    pairs: int,
    server_pids: list[int],
    *,
    before_send: Any = None,
) -> dict[str, Any]:
    """A throughput run then a latency run at ~10% of it, through servers already up."""
    receivers = [_spawn("receiver", *recv_args, "--pair", str(i)) for i in range(pairs)]
    try:
        keys = [_readjson(r)["key"] for r in receivers]
        if before_send is not None:
            before_send(keys)

        def run_senders(rate: float, secs: float) -> tuple[int, float]:
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
            outs = [_readjson(s) for s in senders]
            for s in senders:
                s.wait()
            return sum(int(o["sent"]) for o in outs), sum(o["cpu_s"] for o in outs)

        cpu0 = sum(_cpu_seconds(pid) for pid in server_pids)
        wall0 = time.monotonic()
        recv_cpu0 = sum(_cpu_seconds(r.pid) for r in receivers)
        sent, send_cpu = run_senders(0, seconds)
        time.sleep(0.2)
        wall = time.monotonic() - wall0
        cpu = (sum(_cpu_seconds(pid) for pid in server_pids) - cpu0) / wall
        recv_cpu = (sum(_cpu_seconds(r.pid) for r in receivers) - recv_cpu0) / wall
        reports = [_ask(r, "tput") for r in receivers]
        received = sum(r["count"] for r in reports)
        duration = max(r["duration_s"] for r in reports)
        pps = received / duration
        mbps = sum(r["payload_bytes"] for r in reports) / duration / 1e6
        reordered = sum(r["reordered"] for r in reports)

        lat_pps = max(100.0, pps * 0.10)
        lat_seconds = max(1.0, min(3.0, seconds / 2))
        run_senders(lat_pps / pairs, lat_seconds)
        time.sleep(0.2)
        lat_reports = [_ask(r, "latency") for r in receivers]
        lat = lat_reports[0]["latency_ms"]
        lat_received = sum(r["count"] for r in lat_reports)
        return {
            "pps": round(pps),
            "mbps": round(mbps, 1),
            "sent": sent,
            "received": received,
            "loss_pct": round(100 * (1 - received / sent), 3) if sent else 0.0,
            "reordered": reordered,
            "server_cpu_pct": round(100 * cpu, 1),
            "receivers_cpu_pct": round(100 * recv_cpu, 1),
            "senders_cpu_pct": round(100 * send_cpu / wall, 1),
            "latency_load_pps": round(lat_pps),
            "latency_received": lat_received,
            "p50_ms": round(lat["p50"], 3),
            "p99_ms": round(lat["p99"], 3),
            "max_ms": round(lat["max"], 3),
        }
    finally:
        for r in receivers:
            if r.stdin is not None and not r.stdin.closed:
                r.stdin.close()
        for r in receivers:
            try:
                r.wait(timeout=10)
            except subprocess.TimeoutExpired:
                r.kill()


def run_bench(
    *, size: int, seconds: float, pairs: int = 1, baseline: bool = True, queue: int = 4096
) -> dict[str, Any]:
    if size < _MIN_SIZE or size > wire.MAX_PACKET_BYTES:
        raise ValueError(f"--size must be between {_MIN_SIZE} and {wire.MAX_PACKET_BYTES}")
    result: dict[str, Any] = {
        "size": size,
        "seconds": seconds,
        "pairs": pairs,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    result["relay"] = _measure("relay", size, seconds, pairs, queue)
    if baseline:
        base = _measure("baseline", size, seconds, pairs, queue)
        result["baseline"] = {"name": "trio TCP byte copy", **base}
        result["relay_vs_baseline_pct"] = round(100 * result["relay"]["pps"] / base["pps"], 1)
    return result


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m relaymesh.bench.relay")
    p.add_argument("role", choices=["relay", "baseline", "receiver", "sender"])
    p.add_argument("--target", choices=["relay", "baseline"], default="relay")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--url", default="")
    p.add_argument("--pair", default="0")
    p.add_argument("--size", type=int, default=1200)
    p.add_argument("--dest", default="")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--queue", type=int, default=4096)
    args = p.parse_args(argv)
    role = {"relay": _relay, "baseline": _baseline, "receiver": _receiver, "sender": _sender}
    trio.run(role[args.role], args)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
