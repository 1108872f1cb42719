"""Relay processes for integration tests: `relaymesh relay` as an operator runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MESH_TEST_CONFIG = """
[mesh]
lease_ttl_s = 2
keepalive_interval_s = 0.5
lost_grace_s = 30

# The tests count clients, peers and forwarded packets: no probe traffic.
[health]
enabled = false
"""


@dataclass
class RelayProc:
    name: str
    region: str
    proc: subprocess.Popen[str]
    info: dict[str, Any]

    @property
    def ws_url(self) -> str:
        return str(self.info["ws_url"])

    @property
    def http_url(self) -> str:
        return str(self.info["http_url"])

    def status(self) -> dict[str, Any]:
        return dict(httpx.get(self.http_url + "/api/v1/status", timeout=5).json())

    def ready(self) -> tuple[int, dict[str, Any]]:
        r = httpx.get(self.http_url + "/readyz", timeout=5)
        return r.status_code, dict(r.json())

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_relay_proc(
    tmp: Path,
    endpoints: list[str],
    region: str,
    name: str,
    *,
    mesh_key: str = "test-mesh-key-0123456789abcdef",
) -> RelayProc:
    cfg = tmp / "relay-test.toml"
    if not cfg.exists():
        cfg.write_text(MESH_TEST_CONFIG)
    key_file = tmp / f"mesh-{abs(hash(mesh_key))}.key"
    if not key_file.exists():
        key_file.write_text(mesh_key + "\n")
    log = (tmp / f"{name}.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relaymesh.cli",
            "--log-level",
            "info",
            "relay",
            "--json",
            "--config",
            str(cfg),
            "--region",
            region,
            "--name",
            name,
            "--port",
            "0",
            "--http-port",
            "0",
            "--stun-port",
            "0",
            "--etcd",
            ",".join(endpoints),
            "--mesh-key-file",
            str(key_file),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"relay {name} exited: {(tmp / f'{name}.log').read_text()[-3000:]}")
    return RelayProc(name, region, proc, json.loads(line))
