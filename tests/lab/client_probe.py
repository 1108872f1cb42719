"""Runs inside a lab namespace: netcheck, or a long-lived home-relay client.

    python -m tests.lab.client_probe netcheck MAP_URL
    python -m tests.lab.client_probe home MAP_URL WINDOW_S INTERVAL_S

``home`` prints one JSON line per netcheck round: the home region and relay,
whether it changed, and the region latencies; it runs until stdin closes.
"""

from __future__ import annotations

import json
import os
import sys

import trio

from region.client import RegionMapSource, open_home_relay
from region.netcheck import run_netcheck
from region.select import HomeSelector
from relay.keys import PrivateKey


async def netcheck(map_url: str) -> None:
    region_map = await RegionMapSource(map_url).fetch()
    report = await run_netcheck(region_map, deadline_s=3)
    print(json.dumps(report.to_json()), flush=True)


async def home(map_url: str, window_s: float, interval_s: float) -> None:
    selector = HomeSelector(window_s=window_s)
    async with open_home_relay(
        map_url, PrivateKey.generate(), selector=selector, netcheck_interval_s=interval_s
    ) as h:
        seen = 0

        def emit() -> None:
            print(
                json.dumps(
                    {
                        "region": h.home.region,
                        "relay": h.home.relay,
                        "changes": len(h.history) - 1,
                        "connected_url": h.client.url,
                        "latency": h.report.region_latency_ms,
                        "reason": h.home.reason,
                    }
                ),
                flush=True,
            )

        emit()
        stdin = trio.lowlevel.FdStream(os.dup(0))
        async with trio.open_nursery() as nursery:

            async def watch_stdin() -> None:
                while await stdin.receive_some(100):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_stdin)
            last = h.report
            while True:
                await trio.sleep(0.05)
                if h.report is not last:
                    last = h.report
                    seen += 1
                    emit()


def main() -> None:
    mode, url = sys.argv[1], sys.argv[2]
    if mode == "netcheck":
        trio.run(netcheck, url)
    else:
        trio.run(home, url, float(sys.argv[3]), float(sys.argv[4]))


if __name__ == "__main__":
    main()
