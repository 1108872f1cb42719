"""Figures for docs/performance.md that need the lab (run as root):

    python -m tests.lab.figures

1. Home-relay changes under jittery latency: two regions at ~30 and ~34 ms
   round trip with 6 ms of jitter on each end, 120 netcheck rounds; the same
   reports go to the hysteresis rule and to "always the minimum".
2. netcheck wall time with 3 and with 20 regions (one relay each, ~10-80 ms
   away), five runs each.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.lab.lab import Lab, start_etcd, start_relay


def jitter_study() -> dict[str, object]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        Lab({"core": 0, "eu": 15, "us": 17, "client": 0}) as lab,
    ):
        etcd = start_etcd(lab, "core", Path(tmp))
        for region in ("eu", "us"):
            start_relay(lab, region, region, f"{region}-1", etcd, Path(tmp))
        time.sleep(2)
        assert lab.wan is not None and lab.wan.stdin is not None and lab.wan.stdout is not None
        lab.wan.stdin.write(json.dumps({"jitter_ms": {"eu": 6, "us": 6}}) + "\n")
        lab.wan.stdin.flush()
        lab.wan.stdout.readline()
        out = lab.run(
            "client",
            sys.executable,
            "-m",
            "tests.lab.client_probe",
            "study",
            f"http://{lab.ips['eu']}:3341",
            "120",
            "0.1",
            timeout=300,
        )
        result: dict[str, object] = json.loads(out.stdout)
        return result


def netcheck_wall(regions: int) -> dict[str, float]:
    delays = {"core": 0.0, "client": 0.0}
    delays.update({f"r{i}": 5 + (35 * i) / max(1, regions - 1) for i in range(regions)})
    with tempfile.TemporaryDirectory() as tmp, Lab(delays) as lab:
        etcd = start_etcd(lab, "core", Path(tmp))
        for i in range(regions):
            start_relay(lab, f"r{i}", f"r{i}", f"r{i}-1", etcd, Path(tmp))
        time.sleep(3)
        walls = []
        for _ in range(5):
            out = lab.run(
                "client",
                sys.executable,
                "-m",
                "tests.lab.client_probe",
                "netcheck",
                f"http://{lab.ips['r0']}:3341",
            )
            walls.append(json.loads(out.stdout)["duration_ms"])
        return {"p50_ms": statistics.median(walls), "max_ms": max(walls)}


def main() -> None:
    print(
        json.dumps(
            {
                "jitter": jitter_study(),
                "netcheck_wall_3_regions": netcheck_wall(3),
                "netcheck_wall_20_regions": netcheck_wall(20),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
