"""The relay's RFC 6455 frame path, cross-tested against wsproto.

What a wsproto client sends (masked, fragmented, control frames between
fragments) must read back as the same bytes and events, however the stream is
cut; what we send must read back in a wsproto client as the same messages;
and every violation wsproto refuses, we refuse with the close code RFC 6455
gives it.
"""

from __future__ import annotations

import struct

import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import (
    BytesMessage,
    CloseConnection,
)
from wsproto.events import (
    Ping as WsPing,
)
from wsproto.events import (
    Pong as WsPong,
)

from relay.protocol.websocket import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    Close,
    FrameReader,
    Ping,
    Pong,
    WebSocketError,
    close_payload,
    encode_frame,
    frame_header,
)
from relay.protocol.wire import CloseReason

MASK = b"\x11\x22\x33\x44"


def client_stream() -> tuple[Connection, bytearray]:
    return Connection(ConnectionType.CLIENT), bytearray()


def wsproto_client_bytes() -> tuple[bytes, bytes, list[object]]:
    """A stream from a wsproto client: two fragmented binary messages with a Ping and a
    Pong between fragments, then a Close. Returns (wire bytes, payload, control events)."""
    conn = Connection(ConnectionType.CLIENT)
    out = b""
    payload = b""
    first = bytes(range(256)) * 300  # 76,800 bytes: a 64-bit length
    for i in range(0, len(first), 10_000):
        piece = first[i : i + 10_000]
        out += conn.send(BytesMessage(data=piece, message_finished=i + 10_000 >= len(first)))
        if i == 20_000:
            out += conn.send(WsPing(payload=b"between"))
        if i == 40_000:
            out += conn.send(WsPong(payload=b"unasked"))
    payload += first
    for piece, last in ((b"a" * 125, False), (b"b" * 126, False), (b"c" * 3, True)):
        out += conn.send(BytesMessage(data=piece, message_finished=last))
        payload += piece
    out += conn.send(CloseConnection(code=4011, reason="bye, é"))
    return out, payload, [Ping(b"between"), Pong(b"unasked"), Close(4011, "bye, é")]


def read_all(chunks: list[bytes], reader: FrameReader) -> tuple[bytes, list[object]]:
    data = b""
    events: list[object] = []
    for chunk in chunks:
        got, evs = reader.receive(chunk)
        data += got
        events.extend(evs)
    return data, events


def test_a_wsproto_client_stream_reads_back_whole() -> None:
    stream, payload, controls = wsproto_client_bytes()
    reader = FrameReader(from_client=True, max_message=1 << 20)
    data, events = read_all([stream], reader)
    assert data == payload
    assert events == controls
    assert reader.closed


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 13, 4096, 65_536])
def test_the_same_stream_cut_anywhere_reads_back_the_same(step: int) -> None:
    stream, payload, controls = wsproto_client_bytes()
    reader = FrameReader(from_client=True, max_message=1 << 20)
    data, events = read_all([stream[i : i + step] for i in range(0, len(stream), step)], reader)
    assert data == payload
    assert events == controls


def test_nothing_is_read_after_a_close() -> None:
    conn = Connection(ConnectionType.CLIENT)
    stream = conn.send(CloseConnection(code=1000)) + b"\x82\x85" + MASK + b"after"
    reader = FrameReader(from_client=True, max_message=100)
    assert reader.receive(stream) == (b"", [Close(1000, "")])
    assert reader.receive(b"\x82\x80" + MASK) == (b"", ())


def test_what_a_server_sends_reads_back_in_a_wsproto_client() -> None:
    conn, _ = client_stream()
    # wsproto's client must see an open connection: its state machine starts open.
    big = bytes(range(256)) * 500
    stream = (
        frame_header(5)
        + b"hello"
        + frame_header(300)
        + b"x" * 300
        + frame_header(len(big))
        + big
        + encode_frame(PONG, b"ping-data", mask=False)
        + encode_frame(CLOSE, close_payload(4002, "bad_frame: " + "é" * 100), mask=False)
    )
    conn.receive_data(stream)
    events = list(conn.events())
    messages = [e.data for e in events if isinstance(e, BytesMessage)]
    assert messages == [b"hello", b"x" * 300, big]
    assert [e.payload for e in events if isinstance(e, WsPong)] == [b"ping-data"]
    (close,) = [e for e in events if isinstance(e, CloseConnection)]
    assert close.code == 4002
    # Cut to 123 bytes of reason at a character boundary, still UTF-8.
    assert close.reason.startswith("bad_frame: é")
    assert len(close.reason.encode()) <= 123


def test_a_masked_frame_we_send_reads_back_in_a_wsproto_server() -> None:
    server = Connection(ConnectionType.SERVER)
    payload = b"through a client's mask" * 1000
    server.receive_data(
        encode_frame(BINARY, payload, mask=True) + encode_frame(PING, b"p", mask=True)
    )
    events = list(server.events())
    assert isinstance(events[0], BytesMessage)
    assert events[0].data == payload
    assert events[1] == WsPing(payload=b"p")
    # And our own reader, as a server, takes it back.
    reader = FrameReader(from_client=True, max_message=1 << 20)
    assert reader.receive(encode_frame(BINARY, payload, mask=True)) == (payload, ())


def test_a_client_reads_unmasked_frames_and_refuses_masked_ones() -> None:
    reader = FrameReader(from_client=False, max_message=100)
    assert reader.receive(frame_header(3) + b"abc") == (b"abc", ())
    with pytest.raises(WebSocketError) as info:
        FrameReader(from_client=False, max_message=100).receive(
            encode_frame(BINARY, b"abc", mask=True)
        )
    assert info.value.reason == CloseReason.PROTOCOL_ERROR


def masked(b0: int, payload: bytes, *, length_bytes: bytes | None = None) -> bytes:
    """A client frame with first byte ``b0``; ``length_bytes`` overrides the length field."""
    if length_bytes is None:
        n = len(payload)
        length_bytes = (
            bytes((0x80 | n,))
            if n < 126
            else bytes((0x80 | 126,)) + struct.pack(">H", n)
            if n <= 0xFFFF
            else bytes((0x80 | 127,)) + struct.pack(">Q", n)
        )
    out = bytearray(payload)
    for i in range(len(out)):
        out[i] ^= MASK[i % 4]
    return bytes((b0,)) + length_bytes + MASK + bytes(out)


VIOLATIONS = [
    ("unmasked", b"\x82\x03abc", CloseReason.PROTOCOL_ERROR),
    ("rsv1", masked(0xC2, b"abc"), CloseReason.PROTOCOL_ERROR),
    ("rsv3", masked(0x92, b"abc"), CloseReason.PROTOCOL_ERROR),
    ("opcode 3", masked(0x83, b"abc"), CloseReason.PROTOCOL_ERROR),
    ("opcode 0xB", masked(0x8B, b"abc"), CloseReason.PROTOCOL_ERROR),
    ("fragmented ping", masked(0x09, b"abc"), CloseReason.PROTOCOL_ERROR),
    ("ping of 126", masked(0x89, b"p" * 126), CloseReason.PROTOCOL_ERROR),
    ("continuation first", masked(0x80, b"abc"), CloseReason.PROTOCOL_ERROR),
    ("new message mid-message", masked(0x02, b"abc") + masked(0x82, b"d"), 1002),
    (
        "16-bit length for 5 bytes",
        masked(0x82, b"hello", length_bytes=b"\xfe\x00\x05"),
        CloseReason.PROTOCOL_ERROR,
    ),
    (
        "64-bit length for 300 bytes",
        masked(0x82, b"x" * 300, length_bytes=b"\xff" + struct.pack(">Q", 300)),
        CloseReason.PROTOCOL_ERROR,
    ),
    (
        "64-bit length with the top bit set",
        masked(0x82, b"", length_bytes=b"\xff" + struct.pack(">Q", 1 << 63)),
        CloseReason.PROTOCOL_ERROR,
    ),
    ("close of one byte", masked(0x88, b"\x03"), CloseReason.PROTOCOL_ERROR),
    ("close code 1005", masked(0x88, struct.pack(">H", 1005)), CloseReason.PROTOCOL_ERROR),
    ("close code 999", masked(0x88, struct.pack(">H", 999)), CloseReason.PROTOCOL_ERROR),
    ("close code 5000", masked(0x88, struct.pack(">H", 5000)), CloseReason.PROTOCOL_ERROR),
    (
        "close reason not UTF-8",
        masked(0x88, struct.pack(">H", 1000) + b"\xff\xfe"),
        CloseReason.INVALID_PAYLOAD,
    ),
    ("text message", masked(0x81, b"hello"), CloseReason.TEXT_MESSAGE),
    ("text after binary fragment", masked(0x02, b"ab") + masked(0x81, b"c"), 1002),
]


@pytest.mark.parametrize(("name", "stream", "code"), VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_violations_are_refused_with_their_close_code(name: str, stream: bytes, code: int) -> None:
    with pytest.raises(WebSocketError) as info:
        FrameReader(from_client=True, max_message=1 << 20).receive(stream)
    assert info.value.reason == code
    # wsproto refuses the same streams (text aside, which it takes and we do not).
    if code != CloseReason.TEXT_MESSAGE:
        server = Connection(ConnectionType.SERVER)
        server.receive_data(stream)
        events = list(server.events())
        assert any(isinstance(e, CloseConnection) and e.code in (1002, 1007) for e in events), (
            name,
            events,
        )


def test_a_message_over_the_limit_is_refused_at_the_header_that_crosses_it() -> None:
    reader = FrameReader(from_client=True, max_message=1000)
    # 600 bytes of a message are fine, then a fragment header claiming 500 more is not,
    # before any of its payload arrives.
    assert reader.receive(masked(0x02, b"a" * 600)) == (b"a" * 600, ())
    header_only = masked(0x80, b"b" * 500)[:8]
    with pytest.raises(WebSocketError) as info:
        reader.receive(header_only)
    assert info.value.reason == CloseReason.MESSAGE_TOO_BIG


def test_the_limit_is_per_message_and_can_be_raised() -> None:
    reader = FrameReader(from_client=True, max_message=1000)
    for _ in range(5):
        assert reader.receive(masked(0x82, b"a" * 1000))[0] == b"a" * 1000
    reader.max_message = 5000
    assert reader.receive(masked(0x82, b"b" * 5000))[0] == b"b" * 5000


def test_close_payload_keeps_the_code_and_fits_a_control_frame() -> None:
    assert close_payload(1005) == b""
    payload = close_payload(4001, "x" * 500)
    assert len(payload) == 125
    assert struct.unpack(">H", payload[:2]) == (4001,)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_frames_that_carry_nothing_are_counted_once_however_the_stream_is_cut(
    step: int,
) -> None:
    """Control frames and empty data frames count in noop_frames (the relay's allowance
    of frames that deliver nothing); frames with payload do not."""
    conn = Connection(ConnectionType.CLIENT)
    stream = (
        conn.send(WsPing(payload=b"p"))
        + conn.send(BytesMessage(data=b"", message_finished=False))
        + conn.send(BytesMessage(data=b"data", message_finished=False))
        + conn.send(WsPong(payload=b""))
        + conn.send(BytesMessage(data=b"", message_finished=True))
        + conn.send(BytesMessage(data=b"more", message_finished=True))
    )
    reader = FrameReader(from_client=True, max_message=1 << 20)
    data, events = read_all([stream[i : i + step] for i in range(0, len(stream), step)], reader)
    assert data == b"datamore"
    assert events == [Ping(b"p"), Pong(b"")]
    assert reader.noop_frames == 4
