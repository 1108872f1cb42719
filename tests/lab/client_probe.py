"""Runs inside a lab namespace: netcheck, or a long-lived home-relay client.

    python -m tests.lab.client_probe netcheck MAP_URL
    python -m tests.lab.client_probe home MAP_URL WINDOW_S INTERVAL_S
    python -m tests.lab.client_probe study MAP_URL ROUNDS INTERVAL_S

``home`` prints one JSON line per netcheck round: the home region and relay,
whether it changed, and the region latencies; it runs until stdin closes.
"""

from __future__ import annotations

import json
import os
import sys

import trio

from region.netcheck import run_netcheck
from region.select import HomeSelector
from relay.protocol.keys import PrivateKey
from relaymesh.home import RegionMapSource, open_home_relay


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


async def study(map_url: str, rounds: int, interval_s: float) -> None:
    """Feed the same netcheck reports to the hysteresis rule and to "always the minimum"."""
    region_map = await RegionMapSource(map_url).fetch()
    selector = HomeSelector()
    naive: str | None = None
    changes = {"hysteresis": 0, "naive": 0}
    for i in range(rounds):
        report = await run_netcheck(region_map, stun_probes=1, deadline_s=2)
        now = trio.current_time()
        selector.observe(
            now,
            report.region_latency_ms,
            report.relay_latency_ms,
            {n.name: r.code for r in region_map.regions for n in r.nodes},
        )
        choice = selector.choose(now)
        if choice is not None and choice.changed and i > 0:
            changes["hysteresis"] += 1
        best = report.preferred_region
        if best is not None:
            if naive is not None and best != naive:
                changes["naive"] += 1
            naive = best
        await trio.sleep(interval_s)
    print(json.dumps({"rounds": rounds, "changes": changes}), flush=True)


def main() -> None:
    mode, url = sys.argv[1], sys.argv[2]
    if mode == "netcheck":
        trio.run(netcheck, url)
    elif mode == "study":
        trio.run(study, url, int(sys.argv[3]), float(sys.argv[4]))
    else:
        trio.run(home, url, float(sys.argv[3]), float(sys.argv[4]))


if __name__ == "__main__":
    main()
