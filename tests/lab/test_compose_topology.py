"""docker-compose.yml's topology, run in network namespaces instead of containers.

No Docker engine here, so `docker-compose config` is read and each etcd and
relay service runs as compose would run it, in a namespace of its own: its
image's entrypoint with the service's command and environment, its volumes
and secrets bind-mounted at the container paths (a private mount namespace
per service), its service name resolving to it (as on a compose network).
A "dockerhost" namespace publishes the services' ports as Docker does
(DNAT to the service, masqueraded), and RELAYMESH_PUBLIC_HOST is its address.

A client in another namespace, which cannot resolve any service name, then
reaches every URL the relays advertise, as a client on the host would:
/healthz and /regionmap of every relay, a STUN binding on every relay,
packets through every relay's WebSocket URL, and a ping across the mesh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.compose_file import ETCD, RELAYS, compose_config, parse_port
from tests.lab.lab import Lab

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: What each image of docker-compose.yml runs (its entrypoint), here.
ENTRYPOINTS = {
    "quay.io/coreos/etcd": ["etcd"],
    "relaymesh": [sys.executable, "-m", "relaymesh.cli"],
    # The image's entrypoint and default command.
    "prom/prometheus": [
        "prometheus",
        "--config.file=/etc/prometheus/prometheus.yml",
        "--storage.tsdb.path=/prometheus",
    ],
}
PUBLISHER = "dockerhost"
CLIENT = "client"
TOKEN = "compose-test-token"  # what compose_config writes into the tokens secret

_MOUNT_SCRIPT = (
    'set -e; n="$1"; shift; i=0; while [ "$i" -lt "$n" ]; do'
    ' mount --bind "$1" "$2"; shift 2; i=$((i + 1)); done; exec "$@"'
)


class ComposeRunner:
    """Runs compose services in the lab, each with its mounts, env and entrypoint."""

    def __init__(self, lab: Lab, doc: dict[str, Any], workdir: Path) -> None:
        self.lab, self.doc, self.workdir = lab, doc, workdir
        self.created: list[Path] = []

    def _mountpoint(self, path: Path, is_file: bool) -> None:
        # Container paths (/etc/relaymesh, /run/secrets, ...) need a mount point on
        # this machine; those made here are removed again by cleanup().
        d = path.parent if is_file else path
        missing = [p for p in [d, *d.parents] if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            self.created.append(p)
        if is_file and not path.exists():
            path.touch()
            self.created.append(path)

    def cleanup(self) -> None:
        for p in reversed(self.created):
            if p.is_dir():
                p.rmdir()
            else:
                p.unlink()

    def mounts(self, name: str) -> list[tuple[Path, Path]]:
        svc = self.doc["services"][name]
        out: list[tuple[Path, Path]] = []
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2]
            if not src.startswith("/"):  # a named volume: a directory of its own
                named = self.workdir / "volumes" / f"{name}-{src}"
                named.mkdir(parents=True, exist_ok=True)
                src = str(named)
            out.append((Path(src), Path(dst)))
        for secret in svc.get("secrets", []):
            src = Path(self.doc["secrets"][secret["source"]]["file"])
            out.append((src, Path("/run/secrets") / secret["source"]))
        for src, dst in out:
            self._mountpoint(dst, src.is_file())
        return out

    def spawn(self, name: str, *extra: str, **kw: Any) -> subprocess.Popen[Any]:
        svc = self.doc["services"][name]
        image = svc["image"].split(":")[0]
        argv = [*ENTRYPOINTS[image], *svc.get("command", []), *extra]
        env = {**os.environ, **{k: str(v) for k, v in (svc.get("environment") or {}).items()}}
        mounts = self.mounts(name)
        pairs = [str(p) for m in mounts for p in m]
        return self.lab.spawn(
            name,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _MOUNT_SCRIPT,
            "sh",
            str(len(mounts)),
            *pairs,
            *argv,
            env=env,
            **kw,
        )


def publish(lab: Lab, doc: dict[str, Any]) -> None:
    """The publisher's ports lead to the services, as Docker's DNAT rules do."""

    def ipt(*rule: str) -> None:
        subprocess.run(lab.cmd(PUBLISHER, "iptables", *rule), check=True, capture_output=True)

    for sysctl in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0"):
        subprocess.run(lab.cmd(PUBLISHER, "sysctl", "-qw", sysctl), check=True)
    for name in RELAYS:
        for port in map(parse_port, doc["services"][name]["ports"]):
            ipt(
                *("-t", "nat", "-A", "PREROUTING", "-p", port.protocol),
                *("--dport", str(port.published), "-j", "DNAT"),
                *("--to-destination", f"{lab.ips[name]}:{port.target}"),
            )
    ipt(
        "-t", "nat", "-A", "POSTROUTING", "-m", "conntrack", "--ctstate", "DNAT", "-j", "MASQUERADE"
    )


def test_compose_topology_is_reachable_from_outside(tmp_path: Path) -> None:
    if shutil.which("etcd") is None:
        pytest.skip("the etcd binary is not installed (Debian package etcd-server)")
    if shutil.which("iptables") is None or shutil.which("unshare") is None:
        pytest.skip("iptables and unshare are needed (tests/run.sh installs iptables)")
    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus)")
    hosts = {name: 0.0 for name in [*ETCD, *RELAYS, "prometheus", PUBLISHER, CLIENT]}
    with Lab(hosts) as lab:
        public = lab.ips[PUBLISHER]
        doc = compose_config(tmp_path / "repo", {"RELAYMESH_PUBLIC_HOST": public})
        runner = ComposeRunner(lab, doc, tmp_path)
        try:
            lab.write_hosts_files()
            # The client knows no service name: only what the relays advertise.
            (Path("/etc/netns") / lab.ns(CLIENT) / "hosts").write_text("127.0.0.1 localhost\n")
            publish(lab, doc)
            for e in ETCD:
                runner.spawn(
                    e, stdout=subprocess.DEVNULL, stderr=(tmp_path / f"{e}.log").open("wb")
                )
            wait_healthy(lab, doc, ETCD)  # depends_on: condition service_healthy
            for name in RELAYS:
                proc = runner.spawn(
                    name,
                    "--json",
                    stdout=subprocess.PIPE,
                    stderr=(tmp_path / f"{name}.log").open("w"),
                    text=True,
                )
                assert proc.stdout is not None
                info = json.loads(proc.stdout.readline() or "{}")
                assert info.get("mesh_ws_url") == f"ws://{name}:3340/derp", (
                    tmp_path / f"{name}.log"
                ).read_text()[-3000:]
                assert info["ws_url"].startswith(f"ws://{public}:")
            runner.spawn(
                "prometheus",
                stdout=subprocess.DEVNULL,
                stderr=(tmp_path / "prometheus.log").open("wb"),
            )
            check_from_outside(lab, tmp_path, public, Path(doc["secrets"]["mesh_key"]["file"]))
            check_prometheus(lab, tmp_path)
        finally:
            lab.close()
            runner.cleanup()


def wait_healthy(lab: Lab, doc: dict[str, Any], names: list[str]) -> None:
    """Each service's own healthcheck command, run in its namespace, until it passes."""
    for name in names:
        test = doc["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD", test
        deadline = time.monotonic() + 60
        while lab.run(name, *test[1:], timeout=30).returncode != 0:
            assert time.monotonic() < deadline, f"{name} never became healthy"
            time.sleep(0.5)


def wait_known(lab: Lab, mesh_key: Path, relays: list[str], node_key: str) -> None:
    """Until every relay (at its advertised HTTP URL) can route to ``node_key``.

    Asked through the operator's peer API, with the bearer token the mesh key gives.
    """
    known = lab.run(
        CLIENT,
        sys.executable,
        "-c",
        "import httpx,sys,time\n"
        "from relay.app import api_token\n"
        "auth = {'Authorization': 'Bearer ' + api_token(open(sys.argv[1], 'rb').read().strip())}\n"
        "deadline = time.monotonic() + 30\n"
        "for url in sys.argv[3:]:\n"
        "    url += '/api/v1/peers/' + sys.argv[2]\n"
        "    while httpx.get(url, headers=auth, timeout=5).status_code != 200:\n"
        "        assert time.monotonic() < deadline, url\n"
        "        time.sleep(0.2)\n",
        str(mesh_key),
        node_key,
        *relays,
    )
    assert known.returncode == 0, known.stderr


def client(lab: Lab, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return lab.run(CLIENT, sys.executable, "-m", "relaymesh.cli", *argv, timeout=timeout)


def check_from_outside(lab: Lab, tmp_path: Path, public: str, mesh_key: Path) -> None:
    first = f"http://{public}:3341"  # eu-1's published HTTP port (docker-compose.yml)
    # Every relay registered, as the region map a host client fetches says.
    deadline = time.monotonic() + 60
    while True:
        out = client(lab, "regionmap", "--url", first, "--json")
        if out.returncode == 0:
            region_map = json.loads(out.stdout)
            nodes = [n for r in region_map["regions"] for n in r["nodes"]]
            if sorted(n["name"] for n in nodes if n["up"]) == sorted(RELAYS):
                break
        assert time.monotonic() < deadline, out.stdout + out.stderr
        time.sleep(0.5)
    assert {n["host"] for n in nodes} == {public}

    # HTTP: every relay's /healthz and /regionmap at its advertised HTTP URL.
    urls = [
        f"http://{public}:{n['http_port']}{p}" for n in nodes for p in ("/healthz", "/regionmap")
    ]
    http = lab.run(
        CLIENT,
        sys.executable,
        "-c",
        "import httpx,json,sys\n"
        "print(json.dumps({u: httpx.get(u, timeout=5).status_code for u in sys.argv[1:]}))",
        *urls,
    )
    assert http.returncode == 0, http.stderr
    assert json.loads(http.stdout) == dict.fromkeys(urls, 200)

    # STUN: a binding answered by every relay at its advertised UDP port (netcheck).
    out = client(lab, "netcheck", "--url", first, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    stun = {p["node"]: p["stun_ms"] for p in report["probes"]}
    assert sorted(stun) == sorted(RELAYS) and all(stun.values()), report
    assert report["udp"] is True

    # WebSocket: a packet into every relay's advertised WebSocket URL reaches one
    # listener (on us-2), across the mesh; then a ping both ways through it.
    keys = {}
    for c in ("a", "b"):
        out = client(lab, "keygen", "--out", str(tmp_path / f"{c}.key"), "--json")
        keys[c] = json.loads(out.stdout)["public_key"]
    by_name = {n["name"]: n for n in nodes}
    listener = lab.spawn(
        CLIENT,
        sys.executable,
        "-m",
        "relaymesh.cli",
        "listen",
        "--url",
        f"ws://{public}:{by_name['us-2']['ws_port']}/derp",
        "--key-file",
        str(tmp_path / "b.key"),
        "--token",
        TOKEN,
        "--count",
        str(len(RELAYS)),
        "--json",
        stdout=subprocess.PIPE,
        text=True,
    )
    assert listener.stdout is not None
    assert json.loads(listener.stdout.readline())["listening"] == keys["b"]
    # Every relay knows where the listener is (the operator's peer API, also at the
    # advertised HTTP URLs) before anything is sent to it.
    wait_known(lab, mesh_key, [f"http://{public}:{n['http_port']}" for n in nodes], keys["b"])
    for name in RELAYS:
        ws_url = f"ws://{public}:{by_name[name]['ws_port']}/derp"
        sent = client(
            lab,
            "send",
            "--url",
            ws_url,
            "--key-file",
            str(tmp_path / "a.key"),
            "--token",
            TOKEN,
            "--to",
            keys["b"],
            f"via {name}",
        )
        assert sent.returncode == 0, (ws_url, sent.stdout, sent.stderr)
    got = [json.loads(listener.stdout.readline()) for _ in RELAYS]
    assert sorted(g["text"] for g in got) == sorted(f"via {name}" for name in RELAYS)
    assert {g["from"] for g in got} == {keys["a"]}
    listener.wait(timeout=10)

    # The SDK's way in: open_peer() from the region map, on both sides.
    peer = lab.spawn(
        CLIENT,
        sys.executable,
        "-m",
        "relaymesh.cli",
        "listen",
        "--url",
        f"http://{public}:{by_name['ap-2']['http_port']}",
        "--key-file",
        str(tmp_path / "b.key"),
        "--token",
        TOKEN,
        "--json",
        stdout=subprocess.PIPE,
        text=True,
    )
    assert peer.stdout is not None
    assert json.loads(peer.stdout.readline())["listening"] == keys["b"]
    wait_known(lab, mesh_key, [f"http://{public}:{n['http_port']}" for n in nodes], keys["b"])
    ping = client(
        lab,
        "ping",
        "--url",
        first,
        "--key-file",
        str(tmp_path / "a.key"),
        "--token",
        TOKEN,
        keys["b"],
        "--count",
        "3",
        "--interval",
        "0.3",
        "--json",
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    answers = [json.loads(line) for line in ping.stdout.splitlines()]
    # The first may go before the pinger's own record reached the listener's relay;
    # from then on every ping is answered.
    assert len(answers) == 3 and all("rtt_ms" in a for a in answers[1:]), answers


def check_prometheus(lab: Lab, tmp_path: Path) -> None:
    """The compose Prometheus scrapes every relay (by service name) and loaded the alerts."""
    out = lab.run(
        "prometheus",
        sys.executable,
        "-c",
        "import httpx,json,time\n"
        "api = 'http://127.0.0.1:9090/api/v1/'\n"
        "deadline = time.monotonic() + 60\n"
        "while True:\n"
        "    try:\n"
        "        targets = httpx.get(api + 'targets').json()['data']['activeTargets']\n"
        "        rules = httpx.get(api + 'rules').json()['data']['groups']\n"
        "    except httpx.HTTPError:\n"
        "        targets, rules = [], []\n"
        "    up = sorted(t['labels']['instance'] for t in targets if t['health'] == 'up')\n"
        "    if len(up) == len(targets) == 6 or time.monotonic() > deadline:\n"
        "        break\n"
        "    time.sleep(1)\n"
        "print(json.dumps({'up': up, 'targets': len(targets),"
        " 'rules': sum(len(g['rules']) for g in rules)}))\n",
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["up"] == sorted(f"{name}:3341" for name in RELAYS), (
        got,
        (tmp_path / "prometheus.log").read_text()[-2000:],
    )
    assert got["rules"] > 0
