"""Direct paths through real NATs (iptables MASQUERADE in network namespaces).

WAN hosts: core (etcd), eu1 and eu2 (relays eu-1 and eu-2, one region), and
two NAT routers, nat-a and nat-b, each with one client on its own LAN. The
clients stream numbered packets with open_peer() and count them.
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


def build(tmp: Path, *, hard_nat_b: bool = False) -> Lab:
    lab = Lab({"core": 0, "eu1": 1, "eu2": 1, "nat-a": 2, "nat-b": 2})
    lab.__enter__()
    try:
        lab.add_nat_host("nat-a", "a", "192.168.1")
        lab.add_nat_host("nat-b", "b", "192.168.2", random_ports=hard_nat_b)
        etcd = start_etcd(lab, "core", tmp)
        start_relay(lab, "eu1", "eu", "eu-1", etcd, tmp)
        start_relay(lab, "eu2", "eu", "eu-2", etcd, tmp)
        time.sleep(1.5)  # both relays registered before clients fetch the map
    except BaseException:
        lab.close()
        raise
    return lab


@pytest.fixture
def nat_lab(tmp_path: Path) -> Iterator[Lab]:
    lab = build(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def map_url(lab: Lab) -> str:
    return f"http://{lab.ips['eu1']}:3341"


def start_receiver(lab: Lab) -> tuple[subprocess.Popen[str], str]:
    proc = lab.spawn(
        "b",
        sys.executable,
        "-m",
        "tests.lab.peer_probe",
        "receive",
        map_url(lab),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "receiver did not start"
    return proc, json.loads(line)["key"]


def ask(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(what + "\n")
    proc.stdin.flush()
    doc: dict[str, Any] = json.loads(proc.stdout.readline())
    return doc


def start_stream(lab: Lab, dest: str, rate: int, seconds: float) -> subprocess.Popen[str]:
    return lab.spawn(
        "a",
        sys.executable,
        "-m",
        "tests.lab.peer_probe",
        "stream",
        map_url(lab),
        dest,
        str(rate),
        str(seconds),
        stdout=subprocess.PIPE,
        text=True,
    )


def lines(proc: subprocess.Popen[str]) -> Iterator[dict[str, Any]]:
    assert proc.stdout is not None
    for line in proc.stdout:
        yield json.loads(line)


def udp_cut(lab: Lab, on: bool) -> None:
    op = "-I" if on else "-D"
    for direction in ("-d", "-s"):
        subprocess.run(
            lab.cmd(
                "nat-a",
                "iptables",
                op,
                "FORWARD",
                "-p",
                "udp",
                direction,
                lab.ips["nat-b"],
                "-j",
                "DROP",
            ),
            check=True,
        )


def test_direct_through_two_nats_then_cut_and_restored(nat_lab: Lab) -> None:
    lab = nat_lab
    receiver, key = start_receiver(lab)
    rate = 100
    sender = start_stream(lab, key, rate, 12)
    states: list[tuple[float, bool]] = []
    summary: dict[str, Any] = {}
    cut_at = restored_at = None
    for doc in lines(sender):
        if doc.get("done"):
            summary = doc
            break
        states.append((doc["t"], doc["direct"]))
        if cut_at is None and doc["t"] >= 4:
            assert doc["direct"], "no direct path after 4 s"
            udp_cut(lab, True)
            cut_at = doc["t"]
        if restored_at is None and doc["t"] >= 8:
            udp_cut(lab, False)
            restored_at = doc["t"]
    report = ask(receiver, "report")
    sent = summary["sent"]
    missing = sent - report["unique"]
    # Reached directly, fell back during the cut, came back after it.
    assert summary["time_to_direct_s"] is not None
    assert any(
        not d for t, d in states if cut_at and restored_at and cut_at + 1.5 < t < restored_at
    )
    assert states[-1][1] is True
    assert summary["upgrades"] >= 2 and summary["fallbacks"] >= 1
    # Only what was sent into the dead path was lost, and all of it was counted. (How
    # long that window is, is a figure: tests/lab/figures_direct.py.)
    assert report["duplicates"] == 0
    assert 0 < missing <= summary["lost_in_cuts"]
    assert report["direct"] > 0


def test_hard_nat_stays_relayed_and_loses_nothing(tmp_path: Path) -> None:
    lab = build(tmp_path, hard_nat_b=True)
    try:
        receiver, key = start_receiver(lab)
        sender = start_stream(lab, key, 50, 6)
        docs = list(lines(sender))
        summary = docs[-1]
        assert all(not d["direct"] for d in docs[:-1])
        assert summary["time_to_direct_s"] is None
        report = ask(receiver, "report")
        assert report["unique"] == summary["sent"] and report["duplicates"] == 0
        assert report["direct"] == 0
    finally:
        lab.close()


def test_udp_blocked_stays_relayed_and_loses_nothing(nat_lab: Lab) -> None:
    lab = nat_lab
    subprocess.run(lab.cmd("a", "iptables", "-A", "OUTPUT", "-p", "udp", "-j", "DROP"), check=True)
    receiver, key = start_receiver(lab)
    sender = start_stream(lab, key, 50, 5)
    docs = list(lines(sender))
    assert all(not d["direct"] for d in docs[:-1])
    report = ask(receiver, "report")
    assert report["unique"] == docs[-1]["sent"] and report["duplicates"] == 0


def test_peer_moving_relays_keeps_its_direct_path_and_every_packet(nat_lab: Lab) -> None:
    lab = nat_lab
    receiver, key = start_receiver(lab)
    sender = start_stream(lab, key, 100, 8)
    moved = False
    direct_after_move = []
    summary: dict[str, Any] = {}
    for doc in lines(sender):
        if doc.get("done"):
            summary = doc
            break
        if not moved and doc["t"] >= 3:
            assert doc["direct"]
            ask(receiver, "move")
            moved = True
        elif moved:
            direct_after_move.append(doc["direct"])
    assert direct_after_move and all(direct_after_move)
    report = ask(receiver, "report")
    assert report["unique"] == summary["sent"] and report["duplicates"] == 0
    assert summary["fallbacks"] == 0
