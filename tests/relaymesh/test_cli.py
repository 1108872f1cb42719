"""The relaymesh command as a user runs it: real processes, real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

RELAYMESH = [sys.executable, "-m", "relaymesh.cli"]


def run(
    *args: str, input: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RELAYMESH, *args], capture_output=True, text=True, input=input, timeout=timeout
    )


@pytest.fixture
def relay_proc(tmp_path: Path) -> Iterator[dict[str, str]]:
    proc = subprocess.Popen(
        [
            *RELAYMESH,
            "relay",
            "--port",
            "0",
            "--http-port",
            "0",
            "--stun-port",
            "0",
            "--json",
            "--key-file",
            str(tmp_path / "relay.key"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        yield json.loads(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def keygen(path: Path) -> str:
    out = run("keygen", "--out", str(path), "--json")
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["public_key"])


def test_keygen_send_listen_round_trip(relay_proc: dict[str, str], tmp_path: Path) -> None:
    alice = keygen(tmp_path / "alice.key")
    bob = keygen(tmp_path / "bob.key")
    url = relay_proc["ws_url"]
    listener = subprocess.Popen(
        [
            *RELAYMESH,
            "listen",
            "--url",
            url,
            "--key-file",
            str(tmp_path / "bob.key"),
            "--count",
            "3",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert listener.stdout is not None
    assert json.loads(listener.stdout.readline())["listening"] == bob
    sent = run(
        "send", "--url", url, "--key-file", str(tmp_path / "alice.key"), "--to", bob, "hello bob"
    )
    assert sent.returncode == 0, sent.stderr
    piped = run(
        "send",
        "--url",
        url,
        "--key-file",
        str(tmp_path / "alice.key"),
        "--to",
        bob,
        "-",
        input="line one\nline two\n",
    )
    assert piped.returncode == 0, piped.stderr
    assert listener.wait(timeout=20) == 0
    out = listener.stdout.read()
    got = [json.loads(line) for line in out.splitlines()]
    assert got == [
        {"from": alice, "text": "hello bob"},
        {"from": alice, "text": "line one"},
        {"from": alice, "text": "line two"},
    ]


def test_region_map_commands_take_a_websocket_url_too(relay_proc: dict[str, str]) -> None:
    """regionmap (like netcheck and ping) needs the HTTP base; given the relay's ws:// URL it
    learns it from the relay's ServerInfo, and reads the same map as from the base."""
    from_ws = run("regionmap", "--url", relay_proc["ws_url"], "--json")
    assert from_ws.returncode == 0, from_ws.stderr
    from_http = run("regionmap", "--url", relay_proc["http_url"], "--json")
    assert from_http.returncode == 0, from_http.stderr
    nodes = [n for r in json.loads(from_ws.stdout)["regions"] for n in r["nodes"]]
    assert [f"ws://{n['host']}:{n['ws_port']}/derp" for n in nodes] == [relay_proc["ws_url"]]
    assert json.loads(from_ws.stdout) == json.loads(from_http.stdout)


def test_relay_prints_how_to_connect(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*RELAYMESH, "relay", "--port", "0", "--http-port", "0", "--stun-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    head = [proc.stdout.readline() for _ in range(4)]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130  # Ctrl-C, as a shell reports it
    text = "".join(head) + proc.stdout.read()
    assert "relay local/relay-1 is up" in text
    assert "relaymesh listen --url ws://127.0.0.1:" in text


def test_keygen_to_stdout_prints_private_then_public() -> None:
    out = run("keygen")
    assert out.returncode == 0
    assert out.stdout.startswith("privkey:") and out.stderr.startswith("nodekey:")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "send",
                "--url",
                "ws://127.0.0.1:1/derp",
                "--key-file",
                "MISSING",
                "--to",
                "nodekey:" + "0" * 64,
                "x",
            ],
            "MISSING: no such key file",
        ),
        (["listen", "--url", "ws://127.0.0.1:1/derp", "--key-file", "KEY"], "cannot connect"),
        (["relay", "--config", "BAD"], "BAD: relay.prot: unknown key"),
        (["relay", "--port", "70000"], "command line: relay.port"),
        (["keygen", "--out", "KEY"], "already exists"),
    ],
)
def test_user_mistakes_are_one_line_not_a_traceback(
    tmp_path: Path, args: list[str], message: str
) -> None:
    key = tmp_path / "k.key"
    assert run("keygen", "--out", str(key)).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[relay]\nprot = 1\n")
    args = [
        a.replace("MISSING", str(tmp_path / "missing.key"))
        .replace("KEY", str(key))
        .replace("BAD", str(bad))
        for a in args
    ]
    message = message.replace("MISSING", str(tmp_path / "missing.key")).replace("BAD", str(bad))
    out = run(*args)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relaymesh: error: "), out.stderr
    assert message in lines[0]


def test_bad_node_key_is_a_usage_error() -> None:
    out = run("send", "--url", "ws://x/derp", "--key-file", "k", "--to", "nodekey:xyz", "m")
    assert out.returncode == 2 and "nodekey" in out.stderr


def test_help_everywhere() -> None:
    for cmd in ([], ["keygen"], ["relay"], ["listen"], ["send"], ["bench"]):
        out = run(*cmd, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout


def test_key_files_are_private(tmp_path: Path) -> None:
    keygen(tmp_path / "a.key")
    assert os.stat(tmp_path / "a.key").st_mode & 0o777 == 0o600
