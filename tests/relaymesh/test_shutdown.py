"""A planned restart, as an operator does it: SIGTERM to a `relaymesh relay` process.

The relay tells its clients it is restarting, lets them move, flushes, and
closes every WebSocket that is left with 1001 (going away) and a reason. A
client that knows other relays (several URLs, or a region map) moves to a
sibling at once, so a numbered stream between two such clients loses
almost nothing (a few packets in flight at the moment of the move, at most).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from relay.client import client_handshake, open_relay_client
from relay.protocol import wire
from relay.protocol.keys import PrivateKey
from tests.conftest import wait_until
from tests.etcd_cluster import EtcdCluster
from tests.relay_procs import start_relay_proc

pytestmark = pytest.mark.slow


def _relay_process(cfg: Path) -> subprocess.Popen[str]:
    free = ["--port", "0", "--http-port", "0", "--stun-port", "0"]
    return subprocess.Popen(
        [sys.executable, "-m", "relaymesh.cli", "relay", "--config", str(cfg), "--json", *free],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def test_sigterm_closes_each_websocket_with_1001_and_a_reason(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text("[relay]\nshutdown_deadline_s = 2.0\n")
    proc = _relay_process(cfg)
    try:
        assert proc.stdout is not None
        info = json.loads(await trio.to_thread.run_sync(proc.stdout.readline))
        with trio.fail_after(20):
            async with open_websocket_url(info["ws_url"], subprotocols=[wire.SUBPROTOCOL]) as ws:
                decoder = wire.FrameDecoder(max_body=wire.MAX_HANDSHAKE_BODY)
                await client_handshake(ws, decoder, PrivateKey.generate())
                decoder.max_body = wire.MAX_FRAME_BODY
                proc.send_signal(signal.SIGTERM)
                events: list[object] = []
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        decoder.receive_data(await ws.get_message())
                        while (frame := decoder.next_frame()) is not None:
                            events.append(wire.decode_body(*frame))
        assert any(isinstance(e, wire.Restarting) for e in events)
        reason = closed.value.reason
        assert reason.code == 1001
        assert reason.reason == "going_away: relay restarting"
        assert await trio.to_thread.run_sync(proc.wait) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _numbered_stream_across_sigterm(
    tmp_path: Path, etcd: EtcdCluster, *, siblings: bool
) -> tuple[int, int, str | None]:
    """Send numbered packets A→B through relay 1 (both clients there), SIGTERM relay 1
    midway. Returns (sent, lost, the URL the receiver ended on)."""
    r1 = start_relay_proc(tmp_path, etcd.endpoints, "eu", f"sd1-{siblings}")
    r2 = start_relay_proc(tmp_path, etcd.endpoints, "eu", f"sd2-{siblings}")
    try:
        urls = [r1.ws_url, r2.ws_url] if siblings else [r1.ws_url]
        a, b = PrivateKey.generate(), PrivateKey.generate()
        got: set[int] = set()
        sent = 0
        async with (
            open_relay_client(urls, a, connect_timeout_s=2.0) as ca,
            open_relay_client(urls, b, connect_timeout_s=2.0) as cb,
            trio.open_nursery() as nursery,
        ):

            async def receive() -> None:
                while True:
                    packet = await cb.receive()
                    got.add(int.from_bytes(packet.payload[:4], "big"))

            nursery.start_soon(receive)
            with trio.fail_after(10):
                await ca.send(b.public, (2**32 - 1).to_bytes(4, "big"))
                await wait_until(lambda: 2**32 - 1 in got)
            got.clear()
            # 4 s at 500 packets/s; SIGTERM after 1 s.
            for seq in range(2000):
                if seq == 500:
                    r1.proc.send_signal(signal.SIGTERM)
                await ca.send(b.public, seq.to_bytes(4, "big"))
                sent += 1
                await trio.sleep(0.002)
            with trio.move_on_after(5):
                await wait_until(lambda: len(got) >= sent)
            nursery.cancel_scope.cancel()
            return sent, sent - len(got & set(range(sent))), cb.url
    finally:
        r1.stop()
        r2.stop()


async def test_a_planned_restart_moves_clients_to_a_sibling_with_little_loss(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    sent, lost, ended_on = await _numbered_stream_across_sigterm(tmp_path, etcd, siblings=True)
    print(f"planned restart, clients with a sibling URL: {lost} of {sent} packets lost")
    assert ended_on is not None and "sd2" not in ended_on  # a URL, not a name
    # Measured: 0-5 of 2000 here; 6-71 before clients moved on Restarting and the
    # relay waited for them.
    assert lost <= 20, f"{lost} of {sent} lost"


def test_sigterm_of_a_relay_on_etcd_logs_no_traceback(tmp_path: Path, etcd: EtcdCluster) -> None:
    # Its own deregistration reaches its watch while it stops: what used to end in etcd3's
    # "Watch callback failed" and a traceback, on every clean stop.
    relay = start_relay_proc(tmp_path, etcd.endpoints, "eu", "quiet-stop")
    try:
        deadline = time.monotonic() + 30
        while relay.ready()[0] != 200:  # registered and watching
            assert time.monotonic() < deadline, relay.ready()
            time.sleep(0.05)
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.proc.wait(timeout=30) == 0
    finally:
        relay.stop()
    assert relay.log is not None
    err = relay.log.read_text()
    assert "shutting down" in err  # the log is the relay's stderr, and it got the SIGTERM
    assert "Traceback" not in err, err
    assert "Watch callback failed" not in err, err
