"""Each reproduction that once ended the whole relay now ends one connection, counted.

Every test runs its attack several times (the failures it guards against were
races that hit in 18-20 of 20 trials), then checks that the close was counted
under the expected label, that nothing was counted as ``internal_error``, and
that a normal client pair is still served.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from relay.client import client_handshake, open_relay_client
from relay.config import load_config
from relay.protocol import wire
from relay.protocol.keys import PrivateKey
from relay.server import RelayServer
from relay.wsstream import WebSocketStream
from tests.conftest import start_relay, wait_until
from tests.relay.hostile import (
    closes_total,
    handshake_from,
    open_raw,
    pair_still_served,
    read_server_key,
    receive_or_reset,
    reset,
    sealed_client_info,
    upgrade_request,
    wait_all_counted,
)

TRIALS = 20

Attack = Callable[[RelayServer], Awaitable[None]]


async def upgrade_then_reset(server: RelayServer) -> None:
    s = await open_raw(server)
    await s.send_all(upgrade_request())
    await reset(s)


async def other_path_then_reset(server: RelayServer) -> None:
    s = await open_raw(server)
    await s.send_all(upgrade_request(path="/nope"))
    await reset(s)


async def bad_subprotocol_then_reset(server: RelayServer) -> None:
    s = await open_raw(server)
    await s.send_all(upgrade_request(subprotocol="chat"))
    await reset(s)


async def upgrade_then_close(server: RelayServer) -> None:
    s = await open_raw(server)
    await s.send_all(upgrade_request())
    await s.aclose()


async def malformed_http_then_reset(server: RelayServer) -> None:
    s = await open_raw(server)
    await s.send_all(b"GET /derp HTTP/1.1\r\nHost: \x00\x01 not a header\r\n\r\n")
    await reset(s)


@pytest.mark.parametrize(
    ("attack", "labels"),
    [
        (upgrade_then_reset, ("closed_before_upgrade", "closed_in_handshake")),
        (other_path_then_reset, ("bad_path",)),
        (bad_subprotocol_then_reset, ("bad_subprotocol",)),
        (upgrade_then_close, ("closed_before_upgrade", "closed_in_handshake")),
        (malformed_http_then_reset, ("closed_before_upgrade", "bad_http")),
    ],
)
async def test_reset_during_upgrade_ends_only_that_connection(
    nursery: trio.Nursery, attack: Attack, labels: tuple[str, ...]
) -> None:
    server, url = await start_relay(nursery)
    for _ in range(TRIALS):
        await attack(server)
    with trio.fail_after(10):
        await wait_until(lambda: closes_total(server, *labels) >= TRIALS)
    await pair_still_served(url)
    await wait_all_counted(server)
    assert closes_total(server, *labels) == TRIALS
    assert server.statistics().closes.get("internal_error", 0) == 0


async def _hostile_client_info(url: str, plain: bytes) -> tuple[int, str]:
    async with open_websocket_url(url, subprotocols=["derp"]) as ws:
        sk = await read_server_key(ws)
        await ws.send_message(sealed_client_info(sk, plain))
        with trio.fail_after(5):
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return int(exc.reason.code), str(exc.reason.reason)
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("plain", "detail"),
    [
        (json.dumps({"version": 2, "challenge": "é" * 64}).encode(), "lower-case hex"),
        (json.dumps({"version": 2, "challenge": "é" * 64}, ensure_ascii=False).encode(), "hex"),
        (b"[" * 2000, "deeper than"),
        (b'{"version": 2, "challenge": ' + b"[" * 2000, "deeper than"),
    ],
    ids=["non_ascii_challenge_escaped", "non_ascii_challenge_utf8", "nested_2000", "nested_in"],
)
async def test_hostile_sealed_client_info_is_closed_4005(
    nursery: trio.Nursery, plain: bytes, detail: str
) -> None:
    server, url = await start_relay(nursery)
    for _ in range(3):
        code, reason = await _hostile_client_info(url, plain)
        assert code == wire.CloseReason.BAD_HANDSHAKE
        assert reason.startswith("bad_handshake: ") and detail in reason
    await pair_still_served(url)
    await wait_all_counted(server)
    assert server.statistics().closes["bad_handshake"] == 3
    assert server.statistics().closes.get("internal_error", 0) == 0


async def test_oversized_packet_is_refused_at_its_header(nursery: trio.Nursery) -> None:
    """A SendPacket claiming 65,537 bytes of payload is closed before any body arrives."""
    server, url = await start_relay(nursery)
    async with open_relay_client(url, PrivateKey.generate()):
        pass
    async with open_websocket_url(url, subprotocols=["derp"]) as ws:
        await client_handshake(ws, wire.FrameDecoder(), PrivateKey.generate())
        header = wire.frame_header(wire.FrameType.SEND_PACKET, 32 + wire.MAX_PACKET_BYTES + 1)
        await ws.send_message(header)
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.get_message()
    assert info.value.reason.code == wire.CloseReason.FRAME_TOO_LARGE
    assert "over the limit of 65568" in str(info.value.reason.reason)
    assert server.statistics().closes["frame_too_large"] == 1


@pytest.mark.parametrize("handshaken", [False, True])
async def test_message_too_big_is_1009_with_a_reason_that_follows_the_rule(
    nursery: trio.Nursery, handshaken: bool
) -> None:
    limit = 70 * 1024
    server, url = await start_relay(nursery, max_receive_message_bytes=limit)
    async with open_websocket_url(url, subprotocols=["derp"]) as ws:
        if handshaken:
            await client_handshake(ws, wire.FrameDecoder(), PrivateKey.generate())
            size = limit + 1
        else:
            await read_server_key(ws)
            size = wire.MAX_PREAUTH_MESSAGE_BYTES + 1  # before the handshake, far less
        await ws.send_message(bytes(size))
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.get_message()
    assert info.value.reason.code == 1009
    assert str(info.value.reason.reason).startswith("message_too_big: ")
    await wait_all_counted(server)
    assert server.statistics().closes["message_too_big"] == 1


async def test_preauth_cap_sheds_the_heaviest_sources_oldest_for_another_source(
    nursery: trio.Nursery,
) -> None:
    cap = 8
    server, _ = await start_relay(nursery, max_preauth_connections=cap, handshake_timeout_s=60)
    held = [await open_raw(server, "127.0.0.1") for _ in range(cap)]
    # Half of them even got as far as the relay's ServerKey.
    for s in held[cap // 2 :]:
        await s.send_all(upgrade_request())
    with trio.fail_after(5):
        await wait_until(lambda: server.statistics().accepts == cap)
    # At the cap, one more from the source that holds all eight is refused at once ...
    extra = await open_raw(server, "127.0.0.1")
    with trio.fail_after(5):
        assert await receive_or_reset(extra) == b""
    assert server.statistics().closes["preauth_refused"] == 1
    # ... while a client from another source takes the place of that source's oldest.
    with trio.fail_after(5):
        ws = await handshake_from(nursery, server, "127.0.0.2", PrivateKey.generate())
    with trio.fail_after(5):
        assert await held[0].receive_some(1024) == b""  # closed by the relay
    assert server.statistics().closes["preauth_shed"] == 1
    assert server.statistics().clients == 1
    await ws.aclose()
    for s in [extra, *held]:
        await s.aclose()
    await wait_all_counted(server)
    assert server.statistics().closes.get("internal_error", 0) == 0


async def test_preauth_cap_sheds_from_the_heaviest_source_not_the_overall_oldest(
    nursery: trio.Nursery,
) -> None:
    server, _ = await start_relay(nursery, max_preauth_connections=4, handshake_timeout_s=60)
    lone = await open_raw(server, "127.0.0.3")
    heavy = [await open_raw(server, "127.0.0.1") for _ in range(3)]
    with trio.fail_after(5):
        await wait_until(lambda: server.statistics().accepts == 4)
    with trio.fail_after(5):
        ws = await handshake_from(nursery, server, "127.0.0.2", PrivateKey.generate())
    # The heaviest source's oldest made room, not the oldest of all (127.0.0.3's).
    with trio.fail_after(5):
        assert await receive_or_reset(heavy[0]) == b""
    assert server.statistics().closes["preauth_shed"] == 1
    # 127.0.0.3's connection is still held: it can still upgrade.
    await lone.send_all(upgrade_request())
    with trio.fail_after(5):
        assert (await lone.receive_some(1024)).startswith(b"HTTP/1.1 101 ")
    await ws.aclose()
    for s in [lone, *heavy]:
        await s.aclose()
    await wait_all_counted(server)
    assert server.statistics().closes.get("internal_error", 0) == 0


async def test_reopening_preauth_flood_from_one_host_never_sheds_another_hosts_client(
    nursery: trio.Nursery,
) -> None:
    """50 connections from 127.0.0.1 that reopen whatever the relay closes, against a cap
    of 8: a client from 127.0.0.2 connecting meanwhile is never shed, and gets in."""
    cap = 8
    server, _ = await start_relay(nursery, max_preauth_connections=cap, handshake_timeout_s=60)
    attempts = 0

    async def hold() -> None:
        nonlocal attempts
        while True:
            s = await open_raw(server, "127.0.0.1")
            attempts += 1
            try:
                await s.send_all(b"GET /derp HTTP/1.1\r\nHost: relay\r\n")
                await receive_or_reset(s)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await s.aclose()

    async with trio.open_nursery() as flood:
        for _ in range(50):
            flood.start_soon(hold)
        # The flood is at the cap and being refused before the client starts.
        with trio.fail_after(30):
            await wait_until(lambda: closes_total(server, "preauth_refused") >= 200)
        for _ in range(5):
            with trio.fail_after(30):
                ws = await handshake_from(nursery, server, "127.0.0.2", PrivateKey.generate())
            assert server.statistics().clients == 1
            await ws.aclose()
            with trio.fail_after(5):
                await wait_until(lambda: server.statistics().clients == 0)
        flood.cancel_scope.cancel()
    await wait_all_counted(server)
    closes = server.statistics().closes
    # Every one of the flood's connections past the cap was its own to lose: the
    # clients took 5 of its places (shed) and it lost the rest at accept (refused).
    assert closes["preauth_shed"] == 5, closes
    assert closes["preauth_refused"] >= 200, closes
    assert closes.get("internal_error", 0) == 0, closes


async def test_mesh_proof_mismatch_is_counted_once(nursery: trio.Nursery) -> None:
    server = RelayServer(load_config(), PrivateKey.generate(), mesh_key=b"the-real-mesh-key")
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}/derp"
    with pytest.raises(Exception, match="unauthorized"):
        async with open_relay_client(url, PrivateKey.generate(), mesh_key=b"a-wrong-mesh-key!"):
            pass
    await wait_all_counted(server)
    closes = server.statistics().closes
    assert closes == {"bad_mesh_key": 1}


async def test_full_size_message_right_after_server_info_is_accepted(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pre-auth message bound ends before ServerInfo is sent, not after: a client that
    sends a full-size message the moment it has read ServerInfo is served even when the
    relay's handler is descheduled right after sending it (a busy relay)."""
    send = WebSocketStream.send

    async def slow_after_server_info(self: WebSocketStream, message: bytes) -> None:
        await send(self, message)
        if message[:1] == b"\x03":
            await trio.sleep(0.2)  # the client sends meanwhile, as on a loaded machine

    monkeypatch.setattr(WebSocketStream, "send", slow_after_server_info)
    server, url = await start_relay(nursery)
    sink = PrivateKey.generate()
    payload = b"x" * wire.MAX_PACKET_BYTES
    async with (
        open_relay_client(url, sink) as receiver,
        open_websocket_url(url, subprotocols=["derp"]) as ws,
    ):
        await client_handshake(ws, wire.FrameDecoder(), PrivateKey.generate())
        await ws.send_message(wire.encode(wire.SendPacket(dest=sink.public.raw, payload=payload)))
        with trio.fail_after(10):
            assert (await receiver.receive()).payload == payload
    assert server.statistics().closes.get("message_too_big", 0) == 0
