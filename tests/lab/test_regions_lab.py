"""Regions with real latency: netcheck ranks them, the SDK picks the nearest, hysteresis holds.

Hosts in network namespaces: core (etcd), three region hosts each running a
relay, and a client. One-way delays 5/20/40 ms give round trips of about
10/40/80 ms from the client (tests/lab/wan.py adds them; the kernel here has
no netem). UDP is blocked with iptables in the client's namespace for the
fallback test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.lab import Lab, start_etcd, start_relay

pytestmark = pytest.mark.slow


@pytest.fixture
def regions_lab(tmp_path: Path) -> Iterator[tuple[Lab, str]]:
    with Lab({"core": 0, "eu": 5, "us": 20, "ap": 40, "client": 0}) as lab:
        etcd = start_etcd(lab, "core", tmp_path)
        for region in ("eu", "us", "ap"):
            start_relay(lab, region, region, f"{region}-1", etcd, tmp_path)
        map_url = f"http://{lab.ips['eu']}:3341"
        # Wait until every relay is in the registry, as the client will see it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = lab.run(
                "client",
                sys.executable,
                "-m",
                "relaymesh.cli",
                "regionmap",
                "--url",
                map_url,
                "--json",
            )
            if (
                out.returncode == 0
                and sum(n["up"] for r in json.loads(out.stdout)["regions"] for n in r["nodes"]) == 3
            ):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("relays did not all register")
        yield lab, map_url


def netcheck(lab: Lab, map_url: str) -> dict[str, Any]:
    out = lab.run("client", sys.executable, "-m", "tests.lab.client_probe", "netcheck", map_url)
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def test_netcheck_ranks_regions_and_http_fallback_when_udp_blocked(
    regions_lab: tuple[Lab, str],
) -> None:
    lab, map_url = regions_lab
    report = netcheck(lab, map_url)
    lat = report["region_latency_ms"]
    assert report["udp"] is True
    assert report["global_addr"].startswith(lab.ips["client"] + ":")
    assert lat["eu"] < lat["us"] < lat["ap"]
    assert lat["eu"] >= 9.5  # the emulated round trip is a floor no probe can beat
    assert report["preferred_region"] == "eu" and report["preferred_relay"] == "eu-1"

    blocked = lab.run("client", "iptables", "-A", "OUTPUT", "-p", "udp", "-j", "DROP")
    assert blocked.returncode == 0, blocked.stderr
    report = netcheck(lab, map_url)
    lat = report["region_latency_ms"]
    assert report["udp"] is False
    assert all(p["http_ms"] is not None and not p["stun_ms"] for p in report["probes"])
    assert lat["eu"] < lat["us"] < lat["ap"]
    assert report["preferred_region"] == "eu"


def read_until(proc: subprocess.Popen[str], pred: Any, timeout_s: float) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("the client exited")
        doc: dict[str, Any] = json.loads(line)
        if pred(doc):
            return doc
    raise AssertionError("condition not reached")


def test_sdk_connects_to_the_nearest_and_switches_only_for_a_clear_gain(
    regions_lab: tuple[Lab, str],
) -> None:
    lab, map_url = regions_lab
    client = lab.spawn(
        "client",
        sys.executable,
        "-m",
        "tests.lab.client_probe",
        "home",
        map_url,
        "3",
        "0.5",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    first = read_until(client, lambda d: True, 30)
    assert (first["region"], first["relay"]) == ("eu", "eu-1")
    assert first["connected_url"] == f"ws://{lab.ips['eu']}:3340/derp"

    # us becomes faster than eu, but only by ~6 ms (RTT 10 → 4): below the 10 ms bar.
    lab.set_delays(us=2)
    time.sleep(5)  # longer than the 3 s window: eu's old samples are gone
    doc = read_until(client, lambda d: d["latency"].get("us", 99) < d["latency"].get("eu", 0), 10)
    assert doc["region"] == "eu" and doc["changes"] == 0

    # Now eu gets slow (RTT ~50 ms) and us is ~20 ms: 30 ms and 60% better. Move.
    lab.set_delays(eu=25, us=10)
    doc = read_until(client, lambda d: d["changes"] >= 1, 20)
    assert (doc["region"], doc["relay"]) == ("us", "us-1")
    doc = read_until(client, lambda d: d["connected_url"] == f"ws://{lab.ips['us']}:3340/derp", 10)
    assert doc["changes"] == 1
    assert client.stdin is not None
    client.stdin.close()
