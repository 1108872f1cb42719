"""docker-compose.yml's topology, run in network namespaces instead of containers.

No Docker engine here, so each compose service gets a namespace of its own
with the service's name resolving to it (as on a compose network): a
3-member etcd cluster (etcd1..3, configured as in docker-compose.yml) and the
six relays started from the very config/<relay>.toml files compose mounts;
only the key paths, which point into the containers, are overridden.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.lab import ROOT, Lab

pytestmark = pytest.mark.slow

RELAYS = [f"{r}-{n}" for r in ("eu", "us", "ap") for n in (1, 2)]
ETCD = ["etcd1", "etcd2", "etcd3"]


def test_compose_topology_runs_and_carries_traffic(tmp_path: Path) -> None:
    binary = shutil.which("etcd")
    if binary is None:
        pytest.skip("the etcd binary is not installed (Debian package etcd-server)")
    hosts = {name: 0.0 for name in [*ETCD, *RELAYS, "client-a", "client-b"]}
    with Lab(hosts) as lab:
        lab.write_hosts_files()
        cluster = ",".join(f"{e}=http://{e}:2380" for e in ETCD)
        for e in ETCD:  # the environment docker-compose.yml gives each member
            lab.spawn(
                e,
                binary,
                "--name",
                e,
                "--data-dir",
                str(tmp_path / e),
                "--initial-cluster",
                cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "relaymesh",
                "--listen-client-urls",
                "http://0.0.0.0:2379",
                "--advertise-client-urls",
                f"http://{e}:2379",
                "--listen-peer-urls",
                "http://0.0.0.0:2380",
                "--initial-advertise-peer-urls",
                f"http://{e}:2380",
                stdout=subprocess.DEVNULL,
                stderr=(tmp_path / f"{e}.log").open("wb"),
            )
        (tmp_path / "mesh.key").write_text("compose-lab-mesh-key-0123456789\n")
        for name in RELAYS:
            proc = lab.spawn(
                name,
                sys.executable,
                "-m",
                "relaymesh.cli",
                "relay",
                "--json",
                "--config",
                str(ROOT / "config" / f"{name}.toml"),
                "--key-file",
                str(tmp_path / f"{name}.key"),
                "--mesh-key-file",
                str(tmp_path / "mesh.key"),
                stdout=subprocess.PIPE,
                stderr=(tmp_path / f"{name}.log").open("w"),
                text=True,
            )
            assert proc.stdout is not None
            info = json.loads(proc.stdout.readline() or "{}")
            assert info.get("ws_url") == f"ws://{name}:3340/derp", (
                tmp_path / f"{name}.log"
            ).read_text()

        # Every relay registered and ready, as a client on the network sees it.
        deadline = time.monotonic() + 60
        while True:
            out = lab.run(
                "client-a",
                sys.executable,
                "-m",
                "relaymesh.cli",
                "regionmap",
                "--url",
                "http://eu-1:3341",
                "--json",
            )
            if out.returncode == 0:
                doc = json.loads(out.stdout)
                up = sorted(n["name"] for r in doc["regions"] for n in r["nodes"] if n["up"])
                if up == sorted(RELAYS):
                    break
            assert time.monotonic() < deadline, out.stdout + out.stderr
            time.sleep(0.5)
        for name in RELAYS:
            ready = lab.run(
                "client-a",
                sys.executable,
                "-c",
                "import httpx,sys; r=httpx.get(sys.argv[1]); print(r.status_code)",
                f"http://{name}:3341/readyz",
            )
            assert ready.stdout.strip() == "200", (name, ready.stdout, ready.stderr)

        # Two peers on the network reach each other through the mesh.
        keys = {}
        for c in ("a", "b"):
            out = lab.run(
                f"client-{c}",
                sys.executable,
                "-m",
                "relaymesh.cli",
                "keygen",
                "--out",
                str(tmp_path / f"{c}.key"),
                "--json",
            )
            keys[c] = json.loads(out.stdout)["public_key"]
        listener = lab.spawn(
            "client-b",
            sys.executable,
            "-m",
            "relaymesh.cli",
            "listen",
            "--url",
            "http://us-2:3341",
            "--key-file",
            str(tmp_path / "b.key"),
            "--json",
            stdout=subprocess.PIPE,
            text=True,
        )
        assert listener.stdout is not None
        assert json.loads(listener.stdout.readline())["listening"] == keys["b"]
        ping = lab.run(
            "client-a",
            sys.executable,
            "-m",
            "relaymesh.cli",
            "ping",
            "--url",
            "http://ap-1:3341",
            "--key-file",
            str(tmp_path / "a.key"),
            keys["b"],
            "--count",
            "3",
            "--interval",
            "0.3",
            "--json",
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        answers = [json.loads(line) for line in ping.stdout.splitlines()]
        assert len(answers) == 3 and all("rtt_ms" in a for a in answers)
