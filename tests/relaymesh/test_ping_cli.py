"""`relaymesh ping` against `relaymesh listen --url http://…`, as two terminals would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "relaymesh.cli"]


def test_ping_goes_direct_after_the_first_round_trip(tmp_path: Path) -> None:
    state = tmp_path / "up.json"
    up = subprocess.Popen(
        [*CLI, "up", "--base-port", "0", "--state-file", str(state)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    listener = None
    try:
        deadline = time.monotonic() + 20
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        http = json.loads(state.read_text())["relays"][0]["http_url"]
        keys = {}
        for name in ("a", "b"):
            out = subprocess.run(
                [*CLI, "keygen", "--out", str(tmp_path / f"{name}.key"), "--json"],
                capture_output=True,
                text=True,
                check=True,
            )
            keys[name] = json.loads(out.stdout)["public_key"]
        listener = subprocess.Popen(
            [*CLI, "listen", "--url", http, "--key-file", str(tmp_path / "b.key"), "--json"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert listener.stdout is not None
        assert json.loads(listener.stdout.readline())["listening"] == keys["b"]
        out = subprocess.run(
            [
                *CLI,
                "ping",
                "--url",
                http,
                "--key-file",
                str(tmp_path / "a.key"),
                keys["b"],
                "--count",
                "4",
                "--interval",
                "0.3",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(lines) == 4 and all("rtt_ms" in line for line in lines)
        assert lines[0]["direct"] is False and lines[0]["relay"]
        assert lines[-1]["direct"] is True and lines[-1]["addr"].startswith("127.0.0.1:")
        human = subprocess.run(
            [
                *CLI,
                "ping",
                "--url",
                http,
                "--key-file",
                str(tmp_path / "a.key"),
                keys["b"],
                "--count",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert human.returncode == 0
        assert "pong from" in human.stdout and " ms" in human.stdout
    finally:
        for proc in (listener, up):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
