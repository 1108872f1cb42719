"""``relaymesh bench --scenario fairness``: a client pair's traffic while another floods.

One relay process, one victim pair (the sender and receiver processes of
the plain bench: a throughput run, then a latency run at ~10% of it), and
one flooding process with a single connection. Each run measures the victim
alone, then under each kind of flood, in the same relay:

- ``keepalive``: 64 KiB WebSocket messages packed with KeepAlive frames (5 B);
- ``ping``: 64 KiB messages packed with Ping frames (each asks for a Pong);
- ``absent``: 64 KiB messages packed with SendPackets to a key nobody has;
- ``preauth``: frames of an unknown type before the handshake, reconnecting
  whenever the relay closes the connection.

The flooder reads what comes back (so the relay never closes it for a full
socket) and sends as fast as the relay takes. Reported per flood: the
victim's packets/s and latency p50, and its packets/s as a ratio of the same
run's unflooded figure (the mean of the victim alone at the start and at the
end of the run, as the machine's load drifts); the median of ``runs`` runs.

The flooder role is run as ``python -m relaymesh.bench.fairness flood ...``;
it is not part of the user-facing CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

import trio

from relay.protocol import wire
from relay.protocol.keys import PrivateKey

from .relay import stream
from .workers import finish, read_json, spawn

__all__ = ["FLOODS", "run_fairness"]

FLOODS = ("keepalive", "ping", "absent", "preauth")
#: What a flood message holds. The relay reads a flood only as fast as its budget for
#: frames that deliver nothing allows, so TCP holds the flooder back: a message small
#: enough to fit the socket buffers is out at once and counted.
_MESSAGE_BYTES = 64 * 1024
_UNKNOWN_TYPE = 0x7F


def _message(kind: str) -> bytes:
    if kind == "keepalive":
        frame = wire.encode(wire.KeepAlive())
    elif kind == "ping":
        frame = wire.encode(wire.Ping(data=b"fairness"))
    elif kind == "absent":
        frame = wire.encode(wire.SendPacket(dest=PrivateKey.generate().public.raw, payload=b""))
    else:
        return wire.frame_header(_UNKNOWN_TYPE, 0) * (4096 // wire.HEADER_BYTES)
    return frame * (_MESSAGE_BYTES // len(frame))


# ---- the flooder (a worker process) -------------------------------------------


async def _flood(args: argparse.Namespace) -> None:
    from relay.client import client_handshake
    from relay.wsstream import HandshakeFailed, WebSocketClosed, connect_websocket

    message = _message(args.kind)
    sent = 0
    connections = 0

    async def flood_once() -> None:
        nonlocal sent, connections
        ws = await connect_websocket(
            args.url,
            subprotocol=wire.SUBPROTOCOL,
            max_message=4 * _MESSAGE_BYTES,
            receive_bytes=64 * 1024,
        )
        # No close handshake at the end: the relay reads a flood only as fast as its
        # budget allows, so a Close would wait behind the rest of it.
        async with ws.stream:
            connections += 1
            if args.kind == "preauth":
                await ws.get_message()  # ServerKey; no ClientInfo follows
            else:
                await client_handshake(ws, wire.FrameDecoder(), PrivateKey.generate())

            async def drain() -> None:
                while True:
                    await ws.get_message()

            async with trio.open_nursery() as nursery:
                if args.kind != "preauth":
                    nursery.start_soon(drain)
                while True:
                    await ws.send_message(message)
                    sent += 1
                    if sent == 1:
                        print(json.dumps({"flooding": True}), flush=True)

    async def flood_forever() -> None:
        while True:
            try:
                await flood_once()
            except* (WebSocketClosed, HandshakeFailed, OSError, trio.BrokenResourceError):
                pass  # closed by the relay (preauth): connect again

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood_forever)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some(1024):
            pass
        nursery.cancel_scope.cancel()
    print(json.dumps({"messages": sent, "connections": connections}), flush=True)


# ---- orchestration ------------------------------------------------------------


def _stop(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Stop a worker that answers with its figures when its stdin closes."""
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        return read_json(proc)
    finally:
        finish(proc)


def _victim(url: str, size: int, seconds: float, relay_pid: int) -> dict[str, Any]:
    common = ["--target", "relay", "--url", url, "--size", str(size)]
    return stream(common, common, seconds, 1, [relay_pid])


def _one_run(size: int, seconds: float, floods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    relay = spawn("relaymesh.bench.relay", "relay", "--queue", "4096")
    try:
        url = f"ws://127.0.0.1:{read_json(relay)['port']}/derp"
        first = _victim(url, size, seconds, relay.pid)
        out: dict[str, dict[str, Any]] = {}
        for kind in floods:
            flooder = spawn("relaymesh.bench.fairness", "flood", "--kind", kind, "--url", url)
            try:
                read_json(flooder)  # its first message is out
                result = _victim(url, size, seconds, relay.pid)
            finally:
                flood = _stop(flooder)
            out[kind] = {**result, "flood": flood}
        # Alone again at the end: the machine's load drifts during a run, and each flood
        # is compared with the mean of the two.
        last = _victim(url, size, seconds, relay.pid)
        out["none"] = {
            k: (first[k] + last[k]) / 2 for k in ("pps", "p50_ms", "p99_ms", "server_cpu_pct")
        }
        return out
    finally:
        finish(relay)


def run_fairness(
    *, size: int, seconds: float, runs: int = 3, floods: tuple[str, ...] = FLOODS
) -> dict[str, Any]:
    """The victim's figures alone and under each flood: medians of ``runs`` runs."""
    if size < 17 or size > wire.MAX_PACKET_BYTES:
        raise ValueError(f"--size must be between 17 and {wire.MAX_PACKET_BYTES}")
    results = [_one_run(size, seconds, floods) for _ in range(runs)]
    summary: dict[str, Any] = {}
    for kind in ("none", *floods):
        rows = [r[kind] for r in results]
        entry: dict[str, Any] = {
            "pps": round(statistics.median(r["pps"] for r in rows)),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in rows), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in rows), 3),
            "server_cpu_pct": round(statistics.median(r["server_cpu_pct"] for r in rows), 1),
        }
        if kind != "none":
            ratios = [r[kind]["pps"] / r["none"]["pps"] for r in results if r["none"]["pps"]]
            entry["pps_ratio"] = round(statistics.median(ratios), 3) if ratios else 0.0
            entry["pps_ratios"] = [round(x, 3) for x in ratios]
            entry["flood_messages"] = [r[kind].get("flood", {}).get("messages") for r in results]
        summary[kind] = entry
    return {
        "scenario": "fairness",
        "size": size,
        "seconds": seconds,
        "runs": runs,
        "cpus": os.cpu_count(),
        "victim": summary,
    }


def describe(r: dict[str, Any]) -> str:
    v = r["victim"]
    lines = [
        f"relaymesh bench --scenario fairness: {r['size']}-byte packets, {r['seconds']:g} s,"
        f" median of {r['runs']} runs, {r['cpus']} cpus",
        f"{'flood':<12}{'victim pps':>12}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}{'relay cpu %':>13}",
    ]
    for kind, x in v.items():
        ratio = f"{x['pps_ratio']:.2f}" if "pps_ratio" in x else "1.00"
        lines.append(
            f"{kind:<12}{x['pps']:>12,}{ratio:>8}{x['p50_ms']:>9.3f}{x['p99_ms']:>9.3f}"
            f"{x['server_cpu_pct']:>13.0f}"
        )
    return "\n".join(lines)


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m relaymesh.bench.fairness")
    p.add_argument("role", choices=["flood"])
    p.add_argument("--kind", choices=FLOODS, required=True)
    p.add_argument("--url", required=True)
    args = p.parse_args(argv)
    trio.run(_flood, args)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
