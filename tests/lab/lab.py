"""Network-namespace labs: hosts with real kernels' networking, joined by tests/lab/wan.py.

Needs root, iproute2 and /dev/net/tun; tests skip with the reason otherwise.
Every host gets ``lo`` and ``wan0`` (10.77.0.N/16); the WAN process adds the
latency configured per host (one way, added on both ends of a path).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from relaymesh.procs import EtcdCluster, EtcdMember, spawn_relay, stop_processes, write_mesh_key

ROOT = Path(__file__).resolve().parents[2]


def need_lab() -> None:
    if os.geteuid() != 0:
        pytest.skip("network-namespace labs need root (CI runs as root)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (tests/run.sh installs it as root)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing: no TUN support for the lab's WAN")


class Lab:
    def __init__(self, delays_ms: dict[str, float]) -> None:
        need_lab()
        self.tag = uuid.uuid4().hex[:6]
        self.hosts = list(delays_ms)
        self.ips = {h: f"10.77.0.{i + 1}" for i, h in enumerate(self.hosts)}
        self.delays = dict(delays_ms)
        self.procs: list[subprocess.Popen[Any]] = []
        self.wan: subprocess.Popen[str] | None = None
        self.extra_hosts: list[str] = []
        self.hosts_dirs: list[Path] = []

    def ns(self, host: str) -> str:
        return f"rm{self.tag}-{host}"

    def __enter__(self) -> Lab:
        try:
            for h in self.hosts:
                subprocess.run(["ip", "netns", "add", self.ns(h)], check=True)
                subprocess.run(["ip", "-n", self.ns(h), "link", "set", "lo", "up"], check=True)
            spec = {
                "hosts": {
                    h: {"netns": f"/var/run/netns/{self.ns(h)}", "ip": self.ips[h]}
                    for h in self.hosts
                },
                "delay_ms": self.delays,
            }
            self.wan = subprocess.Popen(
                [sys.executable, "-m", "tests.lab.wan", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            assert self.wan.stdout is not None
            if self.wan.stdout.readline().strip() != "ready":
                raise RuntimeError("the lab WAN did not start")
            for h in self.hosts:
                subprocess.run(
                    ["ip", "-n", self.ns(h), "addr", "add", f"{self.ips[h]}/16", "dev", "wan0"],
                    check=True,
                )
                subprocess.run(["ip", "-n", self.ns(h), "link", "set", "wan0", "up"], check=True)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_nat_host(
        self, router: str, host: str, subnet: str, *, random_ports: bool = False
    ) -> str:
        """A host on a LAN behind ``router`` (a WAN host), masqueraded to the WAN.

        ``random_ports``: the NAT picks a random port per destination (a "hard"
        NAT, as ``MASQUERADE --random``); otherwise it keeps the source port,
        so one socket has one public mapping for every destination.
        """
        i = len(self.extra_hosts)
        self.extra_hosts.append(host)
        r_if, h_if = f"v{self.tag[:5]}{i}r", f"v{self.tag[:5]}{i}h"
        steps = [
            ["ip", "netns", "add", self.ns(host)],
            ["ip", "-n", self.ns(host), "link", "set", "lo", "up"],
            ["ip", "link", "add", r_if, "type", "veth", "peer", "name", h_if],
            ["ip", "link", "set", r_if, "netns", self.ns(router)],
            ["ip", "link", "set", h_if, "netns", self.ns(host)],
            ["ip", "-n", self.ns(router), "addr", "add", f"{subnet}.1/24", "dev", r_if],
            ["ip", "-n", self.ns(router), "link", "set", r_if, "up"],
            ["ip", "-n", self.ns(host), "addr", "add", f"{subnet}.2/24", "dev", h_if],
            ["ip", "-n", self.ns(host), "link", "set", h_if, "up"],
            ["ip", "-n", self.ns(host), "route", "add", "default", "via", f"{subnet}.1"],
            self.cmd(router, "sysctl", "-qw", "net.ipv4.ip_forward=1"),
            self.cmd(
                router,
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan0",
                "-j",
                "MASQUERADE",
                *(["--random"] if random_ports else []),
            ),
            # A home router's firewall: nothing unsolicited from the WAN reaches the
            # router itself. (Without it, an early ping from the peer is accepted
            # into conntrack, and the router then maps our reply to another port.)
            self.cmd(
                router,
                "iptables",
                "-A",
                "INPUT",
                "-i",
                "wan0",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ),
            self.cmd(router, "iptables", "-A", "INPUT", "-i", "wan0", "-j", "DROP"),
        ]
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        self.ips[host] = f"{subnet}.2"
        return f"{subnet}.2"

    def write_hosts_files(self) -> None:
        """Name resolution in the lab: every host name → its address, in every namespace.

        ``ip netns exec`` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts, so
        programs in the lab resolve names as containers do on a compose network.
        """
        lines = ["127.0.0.1 localhost"] + [f"{ip} {h}" for h, ip in self.ips.items()]
        for h in [*self.hosts, *self.extra_hosts]:
            d = Path("/etc/netns") / self.ns(h)
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text("\n".join(lines) + "\n")
            self.hosts_dirs.append(d)

    def set_delays(self, **delays_ms: float) -> None:
        assert self.wan is not None and self.wan.stdin is not None and self.wan.stdout
        self.wan.stdin.write(json.dumps({"delay_ms": delays_ms}) + "\n")
        self.wan.stdin.flush()
        assert self.wan.stdout.readline().strip() == "ok"

    def cmd(self, host: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cmd(host, *argv), capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )

    def spawn(self, host: str, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.cmd(host, *argv), cwd=ROOT, **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        stop_processes(self.procs)
        if self.wan is not None and self.wan.poll() is None:
            self.wan.kill()
            self.wan.wait()
        for h in [*self.hosts, *self.extra_hosts]:
            subprocess.run(["ip", "netns", "del", self.ns(h)], capture_output=True)
        for d in self.hosts_dirs:
            shutil.rmtree(d, ignore_errors=True)


def start_etcd(lab: Lab, host: str, workdir: Path) -> str:
    """One etcd member on ``host`` (ports 2379, 2380 of its lab address); its client URL.

    Not waited for: the relays retry until it answers.
    """
    binary = shutil.which("etcd")
    if binary is None:
        pytest.skip("the etcd binary is not installed (Debian package etcd-server)")
    member = EtcdMember("lab", 2379, 2380, workdir / "etcd", host=lab.ips[host])
    cluster = EtcdCluster([member], binary, prefix=lab.cmd(host))
    cluster.start(member)
    assert member.proc is not None
    lab.procs.append(member.proc)
    return member.url


def start_relay(
    lab: Lab,
    host: str,
    region: str,
    name: str,
    etcd: str,
    workdir: Path,
    *,
    config: Path | None = None,
) -> dict[str, Any]:
    """``relaymesh relay`` on ``host`` (ports 3340, 3341, 3478); the JSON line it printed."""
    mesh_key = workdir / "mesh.key"
    if not mesh_key.exists():
        write_mesh_key(mesh_key)
    cfg = workdir / "lab-relay.toml"
    if not cfg.exists():
        cfg.write_text("[mesh]\nlease_ttl_s = 3\nkeepalive_interval_s = 1.0\n")
    relay = spawn_relay(
        workdir,
        region=region,
        name=name,
        etcd=etcd,
        mesh_key_file=mesh_key,
        config=config or cfg,
        port=3340,
        http_port=3341,
        stun_port=3478,
        listen_host="0.0.0.0",
        advertise_host=lab.ips[host],
        prefix=lab.cmd(host),
    )
    lab.procs.append(relay.proc)
    return relay.wait_started().info
