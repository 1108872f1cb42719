"""STUN: codec tables both ways, fuzzing, real UDP, and third-party clients."""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from relay.protocol import stun
from relay.protocol.stun import (
    StunError,
    decode_request,
    decode_response,
    encode_request,
    handle_datagram,
)
from relay.stun_server import StunStats, serve_stun

TID = bytes(range(1, 13))


def test_request_bytes_and_fingerprint() -> None:
    req = encode_request(TID)
    # type 0x0001, length 8 (the FINGERPRINT), cookie, transaction id
    assert req[:20] == b"\x00\x01\x00\x08\x21\x12\xa4\x42" + TID
    assert req[20:24] == b"\x80\x28\x00\x04"
    assert decode_request(req) == stun.BindingRequest(TID, False)


def test_response_exact_bytes_ipv4() -> None:
    resp = handle_datagram(encode_request(TID), "192.0.2.1", 32853)
    assert resp[:2] == b"\x01\x01" and resp[4:20] == b"\x21\x12\xa4\x42" + TID
    # XOR-MAPPED-ADDRESS first: port 32853 ^ 0x2112, address ^ cookie.
    assert resp[20:32] == (
        b"\x00\x20\x00\x08\x00\x01"
        + struct.pack(">H", 32853 ^ 0x2112)
        + bytes(a ^ b for a, b in zip(bytes([192, 0, 2, 1]), b"\x21\x12\xa4\x42", strict=True))
    )
    assert decode_response(resp) == (TID, "192.0.2.1", 32853)


def test_response_ipv6() -> None:
    resp = handle_datagram(encode_request(TID), "2001:db8::1", 4242)
    assert decode_response(resp) == (TID, "2001:db8::1", 4242)


def test_classic_rfc3489_request_gets_mapped_address() -> None:
    tid16 = bytes(range(16))
    req = b"\x00\x01\x00\x00" + tid16
    resp = handle_datagram(req, "198.51.100.7", 5000)
    assert resp[4:20] == tid16
    assert resp[20:24] == b"\x00\x01\x00\x08"  # MAPPED-ADDRESS only, no cookie tricks
    assert decode_response(resp) == (tid16, "198.51.100.7", 5000)


def test_unknown_required_attribute_gets_420() -> None:
    body = struct.pack(">HH", 0x0042, 4) + b"abcd"
    req = b"\x00\x01" + struct.pack(">H", len(body)) + b"\x21\x12\xa4\x42" + TID + body
    resp = handle_datagram(req, "192.0.2.1", 1)
    assert resp[:2] == b"\x01\x11"
    assert b"\x00\x0a\x00\x02\x00\x42" in resp  # UNKNOWN-ATTRIBUTES lists 0x0042
    with pytest.raises(StunError):
        decode_response(resp)


def test_change_request_is_not_answered() -> None:
    body = struct.pack(">HHI", 0x0003, 4, 0x06)
    with pytest.raises(StunError, match="changed address"):
        handle_datagram(b"\x00\x01\x00\x08" + bytes(16) + body, "192.0.2.1", 1)
    # Flags zero: an ordinary request.
    plain = struct.pack(">HHI", 0x0003, 4, 0)
    assert handle_datagram(b"\x00\x01\x00\x08" + bytes(16) + plain, "192.0.2.1", 1)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01\x00\x00" + bytes(15),  # short header
        b"\xc0\x01\x00\x00" + bytes(16),  # top bits set (e.g. RTP, DTLS)
        b"\x00\x01\x00\x04" + bytes(16),  # length says 4, no body
        b"\x00\x01\x00\x03" + bytes(16) + b"abc",  # length not a multiple of 4
        b"\x01\x01\x00\x00" + bytes(16),  # a response, not a request
        b"\x00\x01\x00\x04" + bytes(16) + b"\x00\x42\x00\x08",  # attribute runs past the end
        encode_request(TID)[:-1] + b"\x00",  # fingerprint broken
    ],
)
def test_malformed_requests_are_refused(data: bytes) -> None:
    with pytest.raises(StunError):
        handle_datagram(data, "192.0.2.1", 1)


def test_encode_request_needs_12_byte_id() -> None:
    with pytest.raises(ValueError):
        encode_request(b"short")


@given(st.binary(max_size=600))
def test_fuzz_server_codec(data: bytes) -> None:
    with contextlib.suppress(StunError):
        handle_datagram(data, "192.0.2.1", 9)


@given(st.binary(max_size=600))
def test_fuzz_client_codec(data: bytes) -> None:
    with contextlib.suppress(StunError):
        decode_response(data)


@given(
    st.ip_addresses(),
    st.integers(min_value=0, max_value=65535),
    st.binary(min_size=12, max_size=12),
)
def test_round_trip_any_address(ip: object, port: int, tid: bytes) -> None:
    resp = handle_datagram(encode_request(tid), str(ip), port)
    assert decode_response(resp) == (tid, str(ip), port)


async def test_round_trip_over_real_udp_and_garbage_is_harmless(nursery: trio.Nursery) -> None:
    stats = StunStats()
    port = await nursery.start(
        lambda task_status: serve_stun("127.0.0.1", 0, stats=stats, task_status=task_status)
    )
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        await sock.sendto(b"garbage that is not stun", ("127.0.0.1", port))
        await sock.sendto(encode_request(TID), ("127.0.0.1", port))
        with trio.fail_after(5):
            data, _ = await sock.recvfrom(2048)
        assert decode_response(data) == (TID, "127.0.0.1", sock.getsockname()[1])
    assert stats.requests == 1 and stats.malformed == 1


async def test_third_party_rfc5389_codec_reads_our_answer(nursery: trio.Nursery) -> None:
    aioice_stun = pytest.importorskip("aioice.stun", reason="aioice is in the test extra")
    port = await nursery.start(serve_stun, "127.0.0.1", 0)
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING, message_class=aioice_stun.Class.REQUEST
    )
    request.add_fingerprint()
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        await sock.sendto(bytes(request), ("127.0.0.1", port))
        with trio.fail_after(5):
            data, _ = await sock.recvfrom(2048)
        reply = aioice_stun.parse_message(data)
        assert reply.message_class == aioice_stun.Class.RESPONSE
        assert reply.transaction_id == request.transaction_id
        assert reply.attributes["XOR-MAPPED-ADDRESS"] == ("127.0.0.1", sock.getsockname()[1])


def test_third_party_rfc3489_client_program() -> None:
    """Debian's stun-client asks 127.0.0.2:3478 (its fixed port) for our mapping."""
    client = shutil.which("stun")
    if client is None:
        pytest.skip(
            "the stun client is not installed (Debian package stun-client;"
            " tests/run.sh installs it as root)"
        )
    script = (
        "import trio\n"
        "from relay.stun_server import serve_stun\n"
        "async def main():\n"
        "    with trio.move_on_after(15):\n"
        "        async with trio.open_nursery() as n:\n"
        "            await n.start(serve_stun, '127.0.0.2', 3478)\n"
        "            print('ready', flush=True)\n"
        "trio.run(main)\n"
    )
    import sys

    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        out = subprocess.run(
            [client, "127.0.0.2", "1", "-v"], capture_output=True, text=True, timeout=20
        )
        assert "MappedAddress = 127.0.0.1:" in out.stdout + out.stderr, out.stdout + out.stderr
    finally:
        server.kill()
        server.wait()
