"""Runs inside a lab namespace: an open_peer() that streams or receives numbered packets.

    python -m tests.lab.peer_probe receive MAP_URL
    python -m tests.lab.peer_probe stream MAP_URL NODEKEY RATE SECONDS

``receive`` prints {"key": ...}, then counts what arrives; a line "report" on
stdin prints the counts, "move" moves it to another relay of its region.
``stream`` sends RATE numbered packets a second for SECONDS, printing the path
every 0.25 s, then a summary with what the path machinery counted.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time

import trio
import trio.lowlevel

from relay.protocol.keys import NodeKey, PrivateKey
from relaymesh.peer import open_peer

SEQ = struct.Struct(">Q")


async def receive(map_url: str) -> None:
    key = PrivateKey.generate()
    seen: set[int] = set()
    dups = 0
    direct = 0
    first_at = last_at = 0.0
    async with open_peer(map_url, key) as peer:
        assert peer.home is not None
        print(json.dumps({"key": str(key.public), "relay": peer.home.home.relay}), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        async with trio.open_nursery() as nursery:

            async def collect() -> None:
                nonlocal dups, direct, first_at, last_at
                while True:
                    got = await peer.receive()
                    last_at = time.monotonic()
                    first_at = first_at or last_at
                    seq = SEQ.unpack(got.payload[:8])[0]
                    if seq in seen:
                        dups += 1
                    seen.add(seq)
                    direct += got.direct

            async def control() -> None:
                nonlocal dups, direct, first_at, last_at
                buf = b""
                while data := await stdin.receive_some(100):
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line == b"report":
                            print(
                                json.dumps(
                                    {
                                        "unique": len(seen),
                                        "duplicates": dups,
                                        "direct": direct,
                                        "max": max(seen, default=-1),
                                        "span_s": last_at - first_at,
                                    }
                                ),
                                flush=True,
                            )
                        elif line == b"reset":
                            seen.clear()
                            dups = direct = 0
                            first_at = last_at = 0.0
                            print(json.dumps({"reset": True}), flush=True)
                        elif line == b"move":
                            assert peer.home is not None
                            here = peer.home.client.url
                            others = [u for u in peer.home.client.urls if u != here]
                            peer.home.client.move_to([*others, here] if here else others)
                            with trio.fail_after(10):
                                while (  # noqa: ASYNC110 - watching the client's state
                                    peer.home.client.url == here or not peer.home.client.connected
                                ):
                                    await trio.sleep(0.01)
                            print(json.dumps({"moved_to": peer.home.client.url}), flush=True)
                nursery.cancel_scope.cancel()

            nursery.start_soon(collect)
            nursery.start_soon(control)


async def stream(map_url: str, dest_text: str, rate: float, seconds: float) -> None:
    dest = NodeKey.parse(dest_text)
    direct = not os.environ.get("RELAYMESH_PROBE_RELAY_ONLY")
    async with open_peer(map_url, PrivateKey.generate(), direct=direct) as peer:
        if rate == 0:
            # As fast as the path takes, after a moment to settle on a path.
            await peer.send(dest, SEQ.pack(2**62) + b"x" * 100)
            await trio.sleep(1.5)
            start = time.monotonic()
            sent = 0
            while time.monotonic() - start < seconds:
                await peer.send(dest, SEQ.pack(sent) + b"x" * 1200)
                sent += 1
                if sent % 64 == 0:
                    await trio.lowlevel.checkpoint()
            await trio.sleep(1.0)
            print(
                json.dumps({"done": True, "sent": sent, "direct": peer.path(dest).direct}),
                flush=True,
            )
            return
        start = time.monotonic()
        first_direct: float | None = None
        sent = 0
        last_report = 0.0
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate) + 1
            while sent < due:
                await peer.send(dest, SEQ.pack(sent) + b"x" * 100)
                sent += 1
            info = peer.path(dest)
            if info.direct and first_direct is None:
                first_direct = elapsed
            if elapsed - last_report >= 0.25:
                last_report = elapsed
                print(
                    json.dumps({"t": round(elapsed, 3), "direct": info.direct, "addr": info.addr}),
                    flush=True,
                )
            await trio.sleep(1 / rate)
        await trio.sleep(1.0)  # let the last packets land
        stats = peer.statistics().get(str(dest), {})
        print(
            json.dumps({"done": True, "sent": sent, "time_to_direct_s": first_direct, **stats}),
            flush=True,
        )


async def pingstats(map_url: str, dest_text: str, count: int) -> None:
    dest = NodeKey.parse(dest_text)
    direct = not os.environ.get("RELAYMESH_PROBE_RELAY_ONLY")
    async with open_peer(map_url, PrivateKey.generate(), direct=direct) as peer:
        rtts = []
        paths = []
        for _ in range(count):
            with trio.fail_after(5):
                rtt, info = await peer.ping(dest)
            rtts.append(round(rtt * 1000, 3))
            paths.append(info.direct)
            await trio.sleep(0.2)
        print(json.dumps({"rtts_ms": rtts, "direct": paths}), flush=True)


def main() -> None:
    if os.environ.get("RELAYMESH_PROBE_DEBUG"):
        import logging

        logging.basicConfig(
            level=logging.DEBUG,
            stream=sys.stderr,
            format="%(relativeCreated)6d %(name)s %(message)s",
        )
        for noisy in ("httpx", "httpcore", "trio-websocket", "relay.client"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if sys.argv[1] == "receive":
        trio.run(receive, sys.argv[2])
    elif sys.argv[1] == "pingstats":
        trio.run(pingstats, sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        trio.run(stream, sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))


if __name__ == "__main__":
    main()
