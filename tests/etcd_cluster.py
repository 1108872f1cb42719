"""Real etcd servers for tests: one member or a cluster, on free loopback ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_etcd() -> str:
    path = shutil.which("etcd")
    if path is None:
        pytest.skip(
            "the etcd binary is not installed (Debian package etcd-server; tests/run.sh"
            " installs it as root)"
        )
    return path


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"


@dataclass
class EtcdCluster:
    members: list[EtcdMember]
    binary: str
    extra: list[str] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self, member: EtcdMember, *, state: str = "new") -> None:
        initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        member.log = member.data_dir.with_suffix(".log")
        member.proc = subprocess.Popen(
            [
                self.binary,
                "--name",
                member.name,
                "--data-dir",
                str(member.data_dir),
                "--listen-client-urls",
                member.url,
                "--advertise-client-urls",
                member.url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{member.peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{member.peer_port}",
                "--initial-cluster",
                initial,
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                "relaymesh-test",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=member.log.open("wb"),
        )

    def wait_healthy(self, member: EtcdMember, timeout_s: float = 20) -> None:
        etcdctl = shutil.which("etcdctl")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if etcdctl:
                ok = (
                    subprocess.run(
                        [etcdctl, "--endpoints", member.url, "endpoint", "health"],
                        capture_output=True,
                        env={"ETCDCTL_API": "3"},
                    ).returncode
                    == 0
                )
            else:
                with socket.socket() as s:
                    ok = s.connect_ex(("127.0.0.1", member.client_port)) == 0
            if ok:
                return
            if member.proc is not None and member.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd {member.name} exited: {member.log and member.log.read_text()[-2000:]}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"etcd {member.name} not healthy after {timeout_s} s")

    def stop(self, member: EtcdMember, *, kill: bool = False) -> None:
        if member.proc is not None and member.proc.poll() is None:
            if kill:
                member.proc.kill()
            else:
                member.proc.terminate()
            member.proc.wait(timeout=10)

    def stop_all(self) -> None:
        for m in self.members:
            self.stop(m, kill=True)

    def etcdctl(self, *args: str) -> str:
        etcdctl = shutil.which("etcdctl")
        assert etcdctl is not None, "etcdctl missing (Debian package etcd-client)"
        out = subprocess.run(
            [etcdctl, "--endpoints", ",".join(self.endpoints), *args],
            capture_output=True,
            text=True,
            env={"ETCDCTL_API": "3"},
            check=True,
        )
        return out.stdout


def start_cluster(tmp: Path, size: int = 1) -> EtcdCluster:
    binary = need_etcd()
    tmp.mkdir(parents=True, exist_ok=True)
    members = [
        EtcdMember(f"m{i}", free_port(), free_port(), tmp / f"m{i}.etcd") for i in range(size)
    ]
    cluster = EtcdCluster(members, binary)
    for m in members:
        cluster.start(m)
    for m in members:
        cluster.wait_healthy(m)
    return cluster
