"""Starting and stopping the processes of a local mesh: etcd and relays.

``relaymesh up --etcd auto`` and the mesh benchmarks run a local etcd and one
relay process per relay; they start and stop them here.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["free_port", "start_local_etcd", "stop_processes"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_local_etcd(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("etcd")
    if binary is None:
        raise RuntimeError(
            "--etcd auto needs the etcd binary on PATH (Debian: apt-get install"
            " etcd-server), or give --etcd URL"
        )
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    log = (workdir / "etcd.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            "--name",
            "up",
            "--data-dir",
            str(workdir / "etcd"),
            "--listen-client-urls",
            url,
            "--advertise-client-urls",
            url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"up=http://127.0.0.1:{peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", client)) == 0:
                return proc, url
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited at start; see {workdir / 'etcd.log'}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("etcd did not start listening within 20 s")


def stop_processes(procs: list[subprocess.Popen[Any]], timeout_s: float = 10) -> None:
    """SIGTERM every process still running (they drain), then kill what outlives the wait."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
