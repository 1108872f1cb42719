"""A relay process held at its resource limits: thousands of pre-auth connections, no fds left.

Each test runs ``relaymesh relay`` as a process (as an operator runs it) and
counts: connections shed, clients still connected, packets delivered, accept
failures in /metrics. Nothing here is timed; ``relaymesh bench --scenario
load`` measures how long a connect takes under the same pressure.
"""

from __future__ import annotations

import os
import resource
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from relay.client import open_relay_client
from relay.protocol.keys import PrivateKey
from relaymesh.procs import RelayProc, start_relay
from tests.conftest import wait_until
from tests.relay.hostile import pair_still_served

#: More than six times the relay's default cap (limits.max_preauth_connections = 1000).
HELD = 6000
CAP = 1000
#: Descriptors this process needs beside the held connections.
MARGIN = 200
#: Half an upgrade request: the relay waits for the rest until its handshake deadline.
PARTIAL_UPGRADE = b"GET /derp HTTP/1.1\r\nHost: relay\r\n"

CONFIG = """
# No probe clients of its own: the tests count every client.
[health]
enabled = false

[limits]
max_preauth_connections = 1000
# Long, so what is held stays held: only shedding closes it.
handshake_timeout_s = 120
"""


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProc]:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(CONFIG)
    proc = start_relay(tmp_path, region="test", name="limits-1", config=cfg, log_level="info")
    try:
        yield proc
    finally:
        proc.stop()


def raise_nofile(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to ``needed``, or skip saying why not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors; RLIMIT_NOFILE hard limit is {hard}")
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def status(relay: RelayProc) -> dict[str, object]:
    return await trio.to_thread.run_sync(relay.status)


async def stats(relay: RelayProc) -> dict[str, object]:
    got = (await status(relay))["stats"]
    assert isinstance(got, dict)
    return got


async def closes(relay: RelayProc) -> dict[str, int]:
    got = (await stats(relay))["closes"]
    assert isinstance(got, dict)
    return got


def turned_away(counted: dict[str, int]) -> int:
    """Pre-auth connections the cap closed: shed for a newer one, or refused at accept."""
    return counted.get("preauth_shed", 0) + counted.get("preauth_refused", 0)


async def wait_shed(relay: RelayProc, n: int) -> None:
    """Until the cap has closed ``n`` pre-auth connections (polled over HTTP)."""
    while turned_away(await closes(relay)) < n:  # noqa: ASYNC110 - another process
        await trio.sleep(0.2)


async def metrics(relay: RelayProc) -> str:
    def get() -> str:
        with urllib.request.urlopen(relay.http_url + "/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    return await trio.to_thread.run_sync(get)


async def hold_preauth(relay: RelayProc, n: int, held: list[trio.SocketStream]) -> None:
    """Open ``n`` connections that each send half an upgrade request and stay open."""
    port = int(relay.info["ws_url"].rsplit(":", 1)[1].split("/", 1)[0])
    limit = trio.Semaphore(256)

    async def one(i: int) -> None:
        async with limit:
            s = await trio.open_tcp_stream(
                "127.0.0.1", port, local_address=f"127.0.2.{1 + i % 200}"
            )
            held.append(s)
            await s.send_all(PARTIAL_UPGRADE)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)


async def close_all(streams: list[trio.SocketStream]) -> None:
    for s in streams:
        await trio.aclose_forcefully(s)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_thousands_of_held_preauth_connections_never_cost_a_client(
    relay: RelayProc,
) -> None:
    """6,000 connections that never finish their upgrade, six times the cap, from 200
    addresses: the relay turns away every one past the cap, stays up, lets a normal
    pair in (from 127.0.0.1, an address holding none of them), and never sheds a client
    that finished its handshake, however many more pre-auth connections come after it."""
    raise_nofile(HELD + 2000 + MARGIN)
    held: list[trio.SocketStream] = []
    try:
        await hold_preauth(relay, HELD, held)
        # Every connection past the cap was refused or took the place of an older one.
        with trio.fail_after(300):
            await wait_shed(relay, HELD - CAP)
        a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
        async with (
            open_relay_client(relay.ws_url, a_key) as a,
            open_relay_client(relay.ws_url, b_key) as b,
        ):
            # Two thousand more pre-auth connections: two thousand more turned away, never
            # the pair.
            await hold_preauth(relay, 2000, held)
            with trio.fail_after(300):
                await wait_shed(relay, HELD + 2000 - CAP)
            assert (await stats(relay))["clients"] == 2
            with trio.fail_after(30):
                await a.send(b_key.public, b"still here")
                assert (await b.receive()).payload == b"still here"
                await b.send(a_key.public, b"so am I")
                assert (await a.receive()).payload == b"so am I"
        with trio.fail_after(60):
            await pair_still_served(relay.ws_url)
    finally:
        await close_all(held)
    assert relay.proc.poll() is None
    counted = await closes(relay)
    assert counted.get("internal_error", 0) == 0, counted


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_out_of_file_descriptors_serves_open_clients_and_accepts_again(
    relay: RelayProc,
) -> None:
    """accept() failing with EMFILE neither ends nor stalls the relay: its clients are
    served meanwhile, each failure is counted, and it accepts again once fds free up."""
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    held: list[trio.SocketStream] = []
    async with (
        open_relay_client(relay.ws_url, a_key) as a,
        open_relay_client(relay.ws_url, b_key) as b,
    ):
        await a.send(b_key.public, b"before")
        assert (await b.receive()).payload == b"before"
        # Room for two more descriptors: the third connection cannot be accepted.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.prlimit(relay.pid, resource.RLIMIT_NOFILE, (open_fds(relay.pid) + 2, hard))
        try:
            await hold_preauth(relay, 8, held)
            assert relay.log is not None
            log = relay.log
            with trio.fail_after(30):
                await wait_until(lambda: "cannot accept connections" in log.read_text(), 0.05)
            # Out of descriptors, the relay still carries its clients' packets.
            for i in range(100):
                await a.send(b_key.public, b"%d" % i)
            for i in range(100):
                assert (await b.receive()).payload == b"%d" % i
            assert relay.proc.poll() is None
        finally:
            await close_all(held)
    # The held connections are gone (and the pair): it accepts new clients again.
    with trio.fail_after(30):
        await pair_still_served(relay.ws_url)
    text = await metrics(relay)
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("relaymesh_accept_errors_total{")
        and 'port="ws"' in line
        and 'reason="EMFILE"' in line
    ]
    assert counted and counted[0] >= 1, "no EMFILE accept errors counted"
    assert relay.proc.poll() is None
