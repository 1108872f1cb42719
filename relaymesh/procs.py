"""Starting and stopping the processes of a local mesh: etcd members and relays.

One launcher for everything that runs real processes: ``relaymesh up --etcd
auto``, the mesh benchmarks and the integration tests all start etcd and
``relaymesh relay`` through here, so they run the same command lines an
operator would and stop them the same way (SIGTERM, so relays drain; SIGKILL
only for what outlives the wait).

A relay is started with ``--json`` and prints one line describing itself
(URLs, ports, key) once it accepts; :meth:`RelayProc.wait_started` reads it.
Start several with :func:`spawn_relay` first and wait afterwards, and they
come up in parallel.

``prefix`` runs a process under another command: the network-namespace lab
(tests/lab/lab.py) starts etcd and relays with ``["ip", "netns", "exec", ns]``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "EtcdCluster",
    "EtcdMember",
    "EtcdMissing",
    "EtcdTLS",
    "RelayProc",
    "free_port",
    "spawn_relay",
    "start_etcd",
    "start_relay",
    "stop_processes",
    "write_mesh_key",
]

#: The command line of ``relaymesh`` in this interpreter, whatever the PATH says.
RELAYMESH = (sys.executable, "-m", "relaymesh.cli")


class EtcdMissing(RuntimeError):
    """The etcd binary is not on PATH."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_mesh_key(path: Path) -> Path:
    """A fresh random mesh key, readable by its owner only; refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def stop_processes(procs: Iterable[subprocess.Popen[Any]], timeout_s: float = 10) -> None:
    """SIGTERM every process still running (they drain), then kill what outlives the wait."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- etcd ----------------------------------------------------------------------


@dataclass(frozen=True)
class EtcdTLS:
    """Serve etcd's client port over TLS: etcd's --cert-file, --key-file, --trusted-ca-file.

    With ``client_cert_auth`` (--client-cert-auth) every client needs a certificate
    signed by ``ca_file``; etcdctl here presents ``cert_file`` (it must allow client auth).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_auth: bool = True

    def etcd_args(self) -> list[str]:
        args = ["--cert-file", str(self.cert_file), "--key-file", str(self.key_file)]
        args += ["--trusted-ca-file", str(self.ca_file)]
        return args + (["--client-cert-auth"] if self.client_cert_auth else [])

    def etcdctl_args(self) -> list[str]:
        cert, key = str(self.cert_file), str(self.key_file)
        return ["--cacert", str(self.ca_file), "--cert", cert, "--key", key]


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    scheme: str = "http"
    #: The address it listens on (and is reached at) for clients and peers.
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


@dataclass
class EtcdCluster:
    """etcd members (on loopback by default); each can be stopped, killed and started again."""

    members: list[EtcdMember]
    binary: str
    extra: list[str] = field(default_factory=list)
    tls: EtcdTLS | None = None
    #: ``user:password`` for etcdctl, once etcd's auth is enabled.
    etcdctl_user: str | None = None
    #: Run etcd (and etcdctl) under this command, e.g. ["ip", "netns", "exec", ns].
    prefix: list[str] = field(default_factory=list)

    def _etcdctl_args(self) -> list[str]:
        args = self.tls.etcdctl_args() if self.tls is not None else []
        return args + (["--user", self.etcdctl_user] if self.etcdctl_user else [])

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self, member: EtcdMember, *, state: str = "new") -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        member.log = member.data_dir.with_suffix(".log")
        member.proc = subprocess.Popen(
            [
                *self.prefix,
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
                member.peer_url,
                "--initial-advertise-peer-urls",
                member.peer_url,
                "--initial-cluster",
                initial,
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                "relaymesh-local",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                *(self.tls.etcd_args() if self.tls is not None else []),
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
                        [
                            *self.prefix,
                            etcdctl,
                            "--endpoints",
                            member.url,
                            *self._etcdctl_args(),
                            "endpoint",
                            "health",
                        ],
                        capture_output=True,
                        env={"ETCDCTL_API": "3"},
                    ).returncode
                    == 0
                )
            else:
                with socket.socket() as s:
                    ok = s.connect_ex((member.host, member.client_port)) == 0
            if ok:
                return
            if member.proc is not None and member.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd {member.name} exited at start; see {member.log}:"
                    f" {member.log and member.log.read_text()[-2000:]}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"etcd {member.name} not healthy after {timeout_s:g} s")

    def stop(self, member: EtcdMember, *, kill: bool = False) -> None:
        if member.proc is not None and member.proc.poll() is None:
            if kill:
                member.proc.kill()
            else:
                member.proc.terminate()
            member.proc.wait(timeout=10)

    def stop_all(self, *, kill: bool = True) -> None:
        for m in self.members:
            self.stop(m, kill=kill)

    def etcdctl(self, *args: str) -> str:
        etcdctl = shutil.which("etcdctl")
        if etcdctl is None:
            raise RuntimeError("etcdctl is not on PATH (Debian package etcd-client)")
        out = subprocess.run(
            [
                *self.prefix,
                etcdctl,
                "--endpoints",
                ",".join(self.endpoints),
                *self._etcdctl_args(),
                *args,
            ],
            capture_output=True,
            text=True,
            env={"ETCDCTL_API": "3"},
            check=True,
        )
        return out.stdout


def start_etcd(workdir: Path, size: int = 1, *, tls: EtcdTLS | None = None) -> EtcdCluster:
    """A new etcd cluster of ``size`` members under ``workdir``, healthy when this returns.

    With ``tls`` its client URLs are https:// (members talk to each other in the clear,
    on loopback).
    """
    binary = shutil.which("etcd")
    if binary is None:
        raise EtcdMissing("the etcd binary is not on PATH (Debian: apt-get install etcd-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    members = [
        EtcdMember(
            f"m{i}",
            free_port(),
            free_port(),
            workdir / f"m{i}.etcd",
            scheme="https" if tls is not None else "http",
        )
        for i in range(size)
    ]
    cluster = EtcdCluster(members, binary, tls=tls)
    try:
        for m in members:
            cluster.start(m)
        for m in members:
            cluster.wait_healthy(m)
    except BaseException:
        cluster.stop_all()
        raise
    return cluster


# ---- relays --------------------------------------------------------------------


@dataclass
class RelayProc:
    """A ``relaymesh relay`` process; ``info`` is the JSON line it printed when it started."""

    name: str
    region: str
    proc: subprocess.Popen[str]
    log: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return str(self.info["ws_url"])

    @property
    def http_url(self) -> str:
        return str(self.info["http_url"])

    def wait_started(self) -> RelayProc:
        """Read the relay's JSON line (it prints it once it accepts); fail if it exited."""
        if self.info:
            return self
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            tail = self.log.read_text()[-3000:] if self.log and self.log.exists() else ""
            raise RuntimeError(f"relay {self.name} exited at start (code {code}) {tail}".rstrip())
        self.info = json.loads(line)
        return self

    def get_json(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET ``path`` on the relay's HTTP port: (status code, JSON body)."""
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=5) as resp:
                return resp.status, dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, dict(json.loads(exc.read()))

    def status(self) -> dict[str, Any]:
        return self.get_json("/api/v1/status")[1]

    def ready(self) -> tuple[int, dict[str, Any]]:
        return self.get_json("/readyz")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10) -> None:
        stop_processes([self.proc], timeout_s)


def spawn_relay(
    workdir: Path,
    *,
    region: str,
    name: str,
    etcd: Sequence[str] | str = (),
    mesh_key_file: Path | None = None,
    config: Path | None = None,
    key_file: Path | None = None,
    port: int = 0,
    http_port: int = 0,
    stun_port: int = 0,
    listen_host: str | None = None,
    advertise_host: str | None = None,
    log_level: str | None = None,
    log: Path | bool | None = True,
    extra: Sequence[str] = (),
    prefix: Sequence[str] = (),
) -> RelayProc:
    """Start ``relaymesh relay --json`` for one relay; call :meth:`RelayProc.wait_started`.

    ``log``: True writes its stderr to ``workdir/<name>.log``, a path writes it
    there, None leaves it on ours, False discards it. ``prefix`` goes before
    the command (``ip netns exec NS``). Without ``etcd`` it is a lone relay (no
    shared state, no mesh).
    """
    argv = [*prefix, *RELAYMESH]
    if log_level:
        argv += ["--log-level", log_level]
    argv += ["relay", "--json", "--region", region, "--name", name]
    if config is not None:
        argv += ["--config", str(config)]
    argv += ["--port", str(port), "--http-port", str(http_port), "--stun-port", str(stun_port)]
    if listen_host is not None:
        argv += ["--listen-host", listen_host]
    if advertise_host is not None:
        argv += ["--advertise-host", advertise_host]
    if etcd:
        argv += ["--etcd", etcd if isinstance(etcd, str) else ",".join(etcd)]
    if mesh_key_file is not None:
        argv += ["--mesh-key-file", str(mesh_key_file)]
    if key_file is not None:
        argv += ["--key-file", str(key_file)]
    argv += list(extra)
    log_path = workdir / f"{name}.log" if log is True else log or None
    stderr: IO[str] | int | None = None if log is None else subprocess.DEVNULL
    if log_path is not None:
        stderr = log_path.open("w")
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
    finally:
        if log_path is not None and not isinstance(stderr, int | None):
            stderr.close()  # the child holds its own descriptor
    return RelayProc(name, region, proc, log_path)


def start_relay(workdir: Path, **options: Any) -> RelayProc:
    """:func:`spawn_relay`, then wait until it accepts."""
    relay = spawn_relay(workdir, **options)
    try:
        return relay.wait_started()
    except BaseException:
        relay.stop()
        raise
