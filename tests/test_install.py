"""A fresh install, without extras, runs every subcommand's real path.

What a new user does: a new venv, ``pip install`` of the project (no test
extra), then the commands the README and ``relaymesh up`` print. A module that
the program imports but the package does not declare (httpx was one) fails
here, not on the user's machine. pip works from its cache, offline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    # Nothing from the test extra came along.
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import pytest"])
    assert probe.returncode != 0
    return venv / "bin" / "relaymesh"


def run(exe: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=_env()
    )
    assert out.returncode == 0, f"relaymesh {' '.join(args)}: {out.stderr[-2000:]}"
    assert "Traceback" not in out.stderr
    return out


def _env() -> dict[str, str]:
    # Not this test's own venv: only what a user's shell would have.
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if ".venv" not in p]
    return {**os.environ, "PATH": os.pathsep.join(path), "PYTHONPATH": ""}


@pytest.fixture
def up(fresh: Path, tmp_path: Path) -> Iterator[tuple[dict[str, object], str]]:
    proc = subprocess.Popen(
        [str(fresh), "up", "--regions", "eu,us", "--relays-per-region", "1", "--base-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=_env(),
    )
    assert proc.stdout is not None
    banner = ""
    while "Ctrl-C stops the mesh." not in banner:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        banner += line
    state = {"banner": banner}
    try:
        yield state, banner
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "Traceback" not in err


def test_every_subcommand_from_a_fresh_install(
    fresh: Path, tmp_path: Path, up: tuple[dict[str, object], str]
) -> None:
    _, banner = up
    # The hints name the program as it can be run from here (no venv on PATH).
    hints = [line.strip() for line in banner.splitlines() if str(fresh) in line]
    assert any(" send --url " in h for h in hints), banner
    assert not any(h.startswith("relaymesh ") for h in hints), banner
    http = next(w for w in banner.split() if w.startswith("http://") and w.count(":") == 2)

    bob = json.loads(run(fresh, "keygen", "--out", "b.key", "--json", cwd=tmp_path).stdout)
    run(fresh, "keygen", "--out", "a.key", cwd=tmp_path)
    assert "eu" in run(fresh, "regionmap", "--url", http, cwd=tmp_path).stdout
    report = json.loads(run(fresh, "netcheck", "--url", http, "--json", cwd=tmp_path).stdout)
    assert report["preferred_region"] in ("eu", "us")

    listener = subprocess.Popen(
        [str(fresh), "listen", "--url", http, "--key-file", "b.key", "--count", "1", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=_env(),
    )
    try:
        assert listener.stdout is not None
        assert json.loads(listener.stdout.readline())["listening"] == bob["public_key"]
        ping = run(
            fresh, "ping", "--url", http, "--key-file", "a.key", "--count", "1",
            bob["public_key"], cwd=tmp_path,
        )  # fmt: skip
        assert "pong from" in ping.stdout
        run(fresh, "send", "--url", http, "--key-file", "a.key", "--to", bob["public_key"],
            "hello", cwd=tmp_path)  # fmt: skip
        assert listener.wait(timeout=30) == 0
        assert json.loads(listener.stdout.readline())["text"] == "hello"
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()

    relay = subprocess.Popen(
        [str(fresh), "relay", "--port", "0", "--http-port", "0", "--stun-port", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
        env=_env(),
    )
    assert relay.stdout is not None
    assert json.loads(relay.stdout.readline())["ws_url"].startswith("ws://")
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(timeout=30) == 0

    bench = run(
        fresh, "bench", "--seconds", "0.2", "--size", "100", "--runs", "1", "--no-baseline",
        "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert json.loads(bench.stdout)
