"""Every mistake an operator or user can make ends in one line, and Ctrl-C in 130.

Each row runs the real command in a subprocess. A relay logs (timestamped
lines, at info by default); the error report itself must be a single line
that starts with ``relaymesh: error:``, and nothing may print a traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.etcd_cluster import free_port

RELAYMESH = [sys.executable, "-m", "relaymesh.cli"]
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR) ")
ZERO_KEY = "nodekey:" + "0" * 64

pytestmark = pytest.mark.slow


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RELAYMESH, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def taken() -> Iterator[dict[str, int]]:
    """A TCP port that is listening and a UDP port that is bound, both by someone else."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    with tcp, udp:
        yield {"TCP": tcp.getsockname()[1], "UDP": udp.getsockname()[1]}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Our key file, and another node's public key."""
    key = tmp_path_factory.mktemp("keys") / "me.key"
    assert run("keygen", "--out", str(key)).returncode == 0
    return key, json.loads(run("keygen", "--json").stdout)["public_key"]


FREE = ["--port", "0", "--http-port", "0", "--stun-port", "0"]

MISTAKES: list[tuple[str, list[str], str]] = [
    (
        "websocket port in use",
        ["relay", "--port", "<TCP>", "--http-port", "0", "--stun-port", "0"],
        r"cannot listen on 127\.0\.0\.1:<TCP> \(WebSocket\): Address already in use",
    ),
    (
        "http port in use",
        ["relay", "--port", "0", "--http-port", "<TCP>", "--stun-port", "0"],
        r"cannot listen on 127\.0\.0\.1:<TCP> \(HTTP\): Address already in use",
    ),
    (
        "stun port in use",
        ["relay", "--port", "0", "--http-port", "0", "--stun-port", "<UDP>"],
        r"cannot listen on 127\.0\.0\.1:<UDP> \(STUN, UDP\): Address already in use",
    ),
    (
        "key file in a missing directory",
        ["relay", *FREE, "--key-file", "<TMP>/no/such/dir/relay.key"],
        r"<TMP>/no/such/dir/relay\.key: cannot create the relay key: No such file or directory",
    ),
    (
        "etcd refuses connections",
        ["relay", *FREE, "--etcd", "http://127.0.0.1:<CLOSED>", "--mesh-key-file", "<MESHKEY>"],
        r"etcd http://127\.0\.0\.1:<CLOSED>: unreachable",
    ),
    (
        "etcd host does not resolve",
        [
            "relay",
            *FREE,
            "--etcd",
            "http://no-such-host.invalid:2379",
            "--mesh-key-file",
            "<MESHKEY>",
        ],
        r"cannot resolve no-such-host\.invalid",
    ),
    (
        "up beside a port in use",
        ["up", "--regions", "eu", "--relays-per-region", "1", "--base-port", "<TCP>"],
        # The HTTP port (base + 1) is bound first; it may be the one taken, too.
        r"relay eu-1: cannot listen on 127\.0\.0\.1:\d+ \((WebSocket|HTTP)\): Address already in",
    ),
    (
        "up with etcd unreachable",
        [
            "up",
            "--regions",
            "eu",
            "--relays-per-region",
            "1",
            "--base-port",
            "0",
            "--etcd",
            "http://127.0.0.1:<CLOSED>",
        ],
        r"relay eu-1: etcd http://127\.0\.0\.1:<CLOSED>: unreachable",
    ),
    (
        "send to a closed port",
        [
            "send",
            "--url",
            "ws://127.0.0.1:<CLOSED>/derp",
            "--key-file",
            "<KEY>",
            "--to",
            "<PEER>",
            "x",
        ],
        r"ws://127\.0\.0\.1:<CLOSED>/derp: cannot connect: Connection refused$",
    ),
    (
        "listen on a closed port",
        ["listen", "--url", "ws://127.0.0.1:<CLOSED>/derp", "--key-file", "<KEY>"],
        r"cannot connect: Connection refused$",
    ),
    (
        "send through a closed http base",
        [
            "send",
            "--url",
            "http://127.0.0.1:<CLOSED>",
            "--key-file",
            "<KEY>",
            "--to",
            "<PEER>",
            "x",
        ],
        r"http://127\.0\.0\.1:<CLOSED>/regionmap: .+",
    ),
    (
        "send to a key that is not a curve point",
        [
            "send",
            "--url",
            "ws://127.0.0.1:<CLOSED>/derp",
            "--key-file",
            "<KEY>",
            "--to",
            ZERO_KEY,
            "x",
        ],
        r"not a usable public key",
    ),
    (
        "ping given an unreachable websocket url",
        ["ping", "--url", "ws://127.0.0.1:<CLOSED>/derp", "--key-file", "<KEY>", "<PEER>"],
        r"ws://127\.0\.0\.1:<CLOSED>/derp: cannot connect: Connection refused$",
    ),
    ("bench for no time", ["bench", "--seconds", "0"], r"--seconds must be more than 0"),
    ("bench with no pairs", ["bench", "--pairs", "0"], r"--pairs must be at least 1"),
    ("bench with no runs", ["bench", "--runs", "0"], r"--runs must be at least 1"),
]


@pytest.mark.parametrize(
    ("args", "expected"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_each_mistake_is_one_line(
    tmp_path: Path, keys: tuple[Path, str], taken: dict[str, int], args: list[str], expected: str
) -> None:
    key, peer = keys
    (tmp_path / "mesh.key").write_text("0123456789abcdef0123456789abcdef\n")
    closed = str(free_port())
    subst = {
        "TCP": str(taken["TCP"]),
        "UDP": str(taken["UDP"]),
        "CLOSED": closed,
        "TMP": str(tmp_path),
        "MESHKEY": str(tmp_path / "mesh.key"),
        "KEY": str(key),
        "PEER": peer,
    }

    def fill(text: str) -> str:
        for name, value in subst.items():
            text = text.replace(f"<{name}>", value)
        return text

    out = run(*[fill(a) for a in args])
    assert "Traceback" not in out.stderr, out.stderr
    report = [line for line in out.stderr.splitlines() if not LOG_LINE.match(line)]
    assert len(report) == 1, out.stderr
    assert report[0].startswith("relaymesh: error: "), out.stderr
    assert re.search(fill(expected), report[0]), report[0]
    assert out.returncode == 1
    # No success banner before the failure.
    assert "is up" not in out.stdout and "relaymesh up:" not in out.stdout


def test_a_reader_that_goes_away_is_not_an_error(tmp_path: Path) -> None:
    """``relaymesh keygen --json | head -c0``: stdout closed under us; quiet, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run(
            [*RELAYMESH, "keygen", "--json"], stdout=write_end, stderr=subprocess.PIPE, timeout=30
        )
    finally:
        os.close(write_end)
    assert out.stderr == b""
    assert out.returncode == 141


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*RELAYMESH, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )


def _interrupt(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_ctrl_c_while_the_relay_starts_is_130_not_a_traceback(tmp_path: Path) -> None:
    """The SIGINT lands before the banner: while the ports are bound, or just after."""
    for _ in range(3):
        proc = _start(["relay", *FREE], tmp_path)
        assert proc.stdout is not None
        proc.stdout.readline()  # the first banner line: the handler must be there already
        code, err = _interrupt(proc)
        assert code == 130, err
        assert "Traceback" not in err


@pytest.fixture
def relay_json(tmp_path: Path) -> Iterator[dict[str, str]]:
    proc = _start(["relay", *FREE, "--json"], tmp_path)
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    try:
        yield info
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


@pytest.mark.parametrize("command", ["listen", "ping"])
def test_ctrl_c_on_a_client_is_130_not_a_traceback(
    tmp_path: Path, relay_json: dict[str, str], command: str
) -> None:
    made = run("keygen", "--out", str(tmp_path / "me.key"), "--json")
    peer = json.loads(made.stdout)["public_key"]
    url = relay_json["http_url"]
    listener = _start(["listen", "--url", url, "--key-file", str(tmp_path / "me.key")], tmp_path)
    assert listener.stdout is not None
    assert "listening as" in listener.stdout.readline()
    if command == "listen":
        proc = listener
    else:
        assert run("keygen", "--out", str(tmp_path / "other.key")).returncode == 0
        proc = _start(
            [
                "ping",
                "--url",
                url,
                "--key-file",
                str(tmp_path / "other.key"),
                "--count",
                "99",
                peer,
            ],
            tmp_path,
        )
        assert proc.stdout is not None
        assert "pong from" in proc.stdout.readline()
    code, err = _interrupt(proc)
    if proc is not listener:
        listener.kill()
        listener.wait()
    assert code == 130, err
    assert "Traceback" not in err
