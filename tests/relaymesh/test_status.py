"""``relaymesh status --watch`` as a terminal user runs it: it redraws, and Ctrl-C ends it.

The command runs as its own process against a real HTTP server on loopback
that serves a mesh document built by relay/health.py (no relay needed: what
is tested is the command's loop, its exit status and its output).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO

import pytest

from relay.health import HealthThresholds, MeshHealth
from tests.etcd_cluster import free_port
from tests.relay.test_health import healthy, record

CLEAR = b"\x1b[H\x1b[2J"
WITHIN_S = 30


class MeshServer:
    """Serves a fresh healthy two-relay document at /api/v1/mesh; counts the requests."""

    def __init__(self) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                now = time.time()
                health = MeshHealth("eu-1", HealthThresholds(interval_s=0.2, stale_after_s=5.0))
                doc = health.update(now, [record("eu-1", "eu"), record("us-1", "us")], healthy())
                body = json.dumps({**doc, "served_at": now}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def mesh_server() -> Iterator[MeshServer]:
    server = MeshServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


class Output:
    """A child's stream, read by a thread; ``wait_for`` blocks until it holds enough."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.data = b""
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        while chunk := stream.read1(65536):  # type: ignore[attr-defined]
            with self._cond:
                self.data += chunk
                self._cond.notify_all()

    def wait_for(self, needle: bytes, count: int) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.data.count(needle) >= count, WITHIN_S):
                raise AssertionError(f"{count} x {needle!r} never came; got {self.data[-2000:]!r}")

    def done(self) -> bytes:
        self._thread.join(WITHIN_S)
        return self.data


def watch(url: str) -> tuple[subprocess.Popen[bytes], Output, Output]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaymesh.cli", "status", "--url", url, "--watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    return proc, Output(proc.stdout), Output(proc.stderr)


def interrupt(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(WITHIN_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_redraws_until_ctrl_c_then_exits_130_quietly(mesh_server: MeshServer) -> None:
    proc, out, err = watch(mesh_server.url)
    # Three draws, each a cleared screen and a fresh fetch.
    out.wait_for(CLEAR, 3)
    out.wait_for(b"PROBLEMS  none", 3)
    assert mesh_server.requests >= 3
    assert interrupt(proc) == 130
    stdout, stderr = out.done(), err.done()
    assert b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr, stderr
    assert stderr == b""
    last = stdout.rsplit(CLEAR, 1)[1].decode()
    assert last.startswith("mesh healthy") and "eu-1" in last and "us-1" in last


def test_watch_keeps_trying_an_unreachable_relay_and_ctrl_c_ends_it() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc, out, err = watch(url)
    err.wait_for(b"relaymesh: error: ", 2)  # it tried twice and goes on
    assert proc.poll() is None
    assert interrupt(proc) == 130
    stderr = err.done()
    out.done()
    assert b"Traceback" not in stderr
    assert all(line.startswith(b"relaymesh: error: ") for line in stderr.splitlines()), stderr
