"""The frame codec: exact bytes both ways, streaming edge cases, fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.protocol import wire
from relay.protocol.wire import (
    MAGIC,
    NEED_DATA,
    CloseReason,
    FrameDecoder,
    FrameType,
    LocalProtocolError,
    RemoteProtocolError,
)

A = bytes(range(32))
B = bytes(range(32, 64))
C = bytes(24 * [7])


def hdr(t: int, n: int) -> bytes:
    return struct.pack(">BI", t, n)


TABLE: list[tuple[wire.Event, bytes]] = [
    (wire.ServerKey(public_key=A, challenge=B), hdr(1, 72) + MAGIC + A + B),
    (wire.ClientInfo(client_key=A, nonce=C, sealed=b"xyz"), hdr(2, 59) + A + C + b"xyz"),
    (wire.ServerInfo(nonce=C, sealed=b"s"), hdr(3, 25) + C + b"s"),
    (wire.SendPacket(dest=B, payload=b"hello"), hdr(4, 37) + B + b"hello"),
    (wire.SendPacket(dest=B, payload=b""), hdr(4, 32) + B),
    (wire.RecvPacket(src=A, payload=b"hi"), hdr(5, 34) + A + b"hi"),
    (wire.KeepAlive(), hdr(6, 0)),
    (wire.NotePreferred(preferred=True), hdr(7, 1) + b"\x01"),
    (wire.NotePreferred(preferred=False), hdr(7, 1) + b"\x00"),
    (wire.PeerGone(peer=A, reason=wire.PeerGoneReason.NOT_HERE), hdr(8, 33) + A + b"\x01"),
    (wire.PeerGone(peer=A, reason=wire.PeerGoneReason.DISCONNECTED), hdr(8, 33) + A + b"\x00"),
    (wire.PeerPresent(peer=B), hdr(9, 32) + B),
    (wire.ForwardPacket(src=A, dest=B, payload=b"p"), hdr(0x0A, 65) + A + B + b"p"),
    (wire.WatchConns(), hdr(0x10, 0)),
    (wire.ClosePeer(peer=A), hdr(0x11, 32) + A),
    (wire.Ping(data=b"12345678"), hdr(0x12, 8) + b"12345678"),
    (wire.Pong(data=b"87654321"), hdr(0x13, 8) + b"87654321"),
    (wire.Health(problem="etcd unreachable"), hdr(0x14, 16) + b"etcd unreachable"),
    (wire.Health(problem=""), hdr(0x14, 0)),
    (
        wire.Restarting(reconnect_in_ms=1500, try_for_ms=60000),
        hdr(0x15, 8) + struct.pack(">II", 1500, 60000),
    ),
    (
        wire.ForwardPackets(src=A, dest=B, payloads=(b"p", b"", b"qr")),
        hdr(0x17, 64 + 15) + A + B + b"\0\0\0\1p" + b"\0\0\0\0" + b"\0\0\0\2qr",
    ),
    (
        wire.PacketsDropped(reason=wire.DropCode.MESH_QUEUE_FULL, count=300),
        hdr(0x16, 5) + b"\x04" + struct.pack(">I", 300),
    ),
    (
        wire.PacketsDroppedFor(src=A, reason=wire.DropCode.QUEUE_FULL, count=7),
        hdr(0x19, 37) + A + b"\x01" + struct.pack(">I", 7),
    ),
    (
        wire.ForwardRun(src=A, dest=B, frames=hdr(5, 33) + A + b"p" + hdr(5, 32) + A),
        hdr(0x18, 64 + 38 + 37) + A + B + hdr(5, 33) + A + b"p" + hdr(5, 32) + A,
    ),
]


@pytest.mark.parametrize(("event", "data"), TABLE, ids=lambda v: type(v).__name__)
def test_encode_gives_exact_bytes(event: wire.Event, data: bytes) -> None:
    assert wire.encode(event) == data


@pytest.mark.parametrize(("event", "data"), TABLE, ids=lambda v: type(v).__name__)
def test_decode_exact_bytes(event: wire.Event, data: bytes) -> None:
    dec = FrameDecoder()
    dec.receive_data(data)
    assert dec.next_event() == event
    assert dec.next_event() is NEED_DATA


def test_byte_at_a_time_gives_every_event_once() -> None:
    stream = b"".join(data for _, data in TABLE)
    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        dec.receive_data(stream[i : i + 1])
        while (ev := dec.next_event()) is not NEED_DATA:
            got.append(ev)
    assert got == [ev for ev, _ in TABLE]
    assert dec.buffered == 0


def test_trailing_partial_frame_is_kept_for_later() -> None:
    first = wire.encode(wire.Ping(data=b"aaaaaaaa"))
    second = wire.encode(wire.SendPacket(dest=A, payload=b"x" * 100))
    dec = FrameDecoder()
    dec.receive_data(first + second[:50])
    assert dec.next_event() == wire.Ping(data=b"aaaaaaaa")
    assert dec.next_event() is NEED_DATA
    assert dec.buffered == 50
    dec.receive_data(second[50:])
    assert dec.next_event() == wire.SendPacket(dest=A, payload=b"x" * 100)


def test_unknown_frame_types_are_skipped_and_counted() -> None:
    dec = FrameDecoder()
    dec.receive_data(hdr(0x7F, 3) + b"abc" + hdr(0x0B, 0) + wire.encode(wire.KeepAlive()))
    assert dec.next_event() == wire.KeepAlive()
    assert dec.skipped_frames == 2


def test_unknown_peer_gone_reason_still_means_gone() -> None:
    ev = wire.decode_body(FrameType.PEER_GONE, A + b"\x09")
    assert ev == wire.PeerGone(peer=A, reason=wire.PeerGoneReason.DISCONNECTED)


def test_oversize_length_fails_on_the_header_alone() -> None:
    dec = FrameDecoder(max_body=100)
    dec.receive_data(hdr(4, 101))
    with pytest.raises(RemoteProtocolError) as info:
        dec.next_event()
    assert info.value.reason is CloseReason.FRAME_TOO_LARGE
    # Broken for good: the connection must close.
    with pytest.raises(RemoteProtocolError):
        dec.next_frame()


def test_split_delivers_frames_before_a_bad_one_then_fails() -> None:
    dec = FrameDecoder(max_body=100)
    good = wire.encode(wire.Ping(data=b"12345678"))
    dec.receive_data(good + hdr(4, 1000) + b"zz")
    assert dec.split() == [(FrameType.PING, b"12345678")]
    with pytest.raises(RemoteProtocolError):
        dec.split()


def test_split_matches_next_frame() -> None:
    stream = b"".join(data for _, data in TABLE)
    a, b = FrameDecoder(), FrameDecoder()
    a.receive_data(stream[:-3])
    b.receive_data(stream[:-3])
    frames = []
    while (f := b.next_frame()) is not None:
        frames.append(f)
    assert a.split() == frames
    assert a.buffered == b.buffered


@pytest.mark.parametrize(("max_frames", "max_bytes"), [(1, None), (3, None), (None, 40), (2, 1)])
def test_split_in_slices_gives_the_same_frames_within_the_bounds(
    max_frames: int | None, max_bytes: int | None
) -> None:
    stream = b"".join(data for _, data in TABLE)
    whole, sliced = FrameDecoder(), FrameDecoder()
    whole.receive_data(stream[:-3])
    sliced.receive_data(stream[:-3])
    frames = []
    while part := sliced.split(max_frames, max_bytes):
        assert max_frames is None or len(part) <= max_frames
        size = sum(wire.HEADER_BYTES + len(body) for _, body in part)
        assert max_bytes is None or size <= max_bytes or len(part) == 1
        frames.extend(part)
    assert frames == whole.split()
    assert sliced.buffered == whole.buffered


@pytest.mark.parametrize(
    ("ftype", "body", "reason"),
    [
        (FrameType.SERVER_KEY, b"NOTMAGIC" + A + B, CloseReason.BAD_HANDSHAKE),
        (FrameType.SERVER_KEY, MAGIC + A, CloseReason.BAD_FRAME),
        (FrameType.SEND_PACKET, b"short", CloseReason.BAD_FRAME),
        (FrameType.RECV_PACKET, b"short", CloseReason.BAD_FRAME),
        (FrameType.FORWARD_PACKET, A, CloseReason.BAD_FRAME),
        (FrameType.CLIENT_INFO, A, CloseReason.BAD_FRAME),
        (FrameType.SERVER_INFO, b"x", CloseReason.BAD_FRAME),
        (FrameType.NOTE_PREFERRED, b"", CloseReason.BAD_FRAME),
        (FrameType.PEER_GONE, A, CloseReason.BAD_FRAME),
        (FrameType.PEER_PRESENT, b"x", CloseReason.BAD_FRAME),
        (FrameType.CLOSE_PEER, A + b"x", CloseReason.BAD_FRAME),
        (FrameType.PING, b"1234567", CloseReason.BAD_FRAME),
        (FrameType.PONG, b"123456789", CloseReason.BAD_FRAME),
        (FrameType.HEALTH, b"\xff\xfe", CloseReason.BAD_FRAME),
        (FrameType.RESTARTING, b"1234", CloseReason.BAD_FRAME),
        (FrameType.PACKETS_DROPPED, b"\x01123", CloseReason.BAD_FRAME),
        (FrameType.FORWARD_PACKETS, A + B, CloseReason.BAD_FRAME),
        (FrameType.FORWARD_PACKETS, A + B + b"\0\0\0\2x", CloseReason.BAD_FRAME),
        (FrameType.FORWARD_PACKETS, A + B + b"\0\0\0\1x\0\0", CloseReason.BAD_FRAME),
    ],
)
def test_malformed_bodies_are_remote_errors(
    ftype: FrameType, body: bytes, reason: CloseReason
) -> None:
    dec = FrameDecoder()
    dec.receive_data(hdr(ftype, len(body)) + body)
    with pytest.raises(RemoteProtocolError) as info:
        dec.next_event()
    assert info.value.reason is reason
    with pytest.raises(RemoteProtocolError):
        dec.next_event()


@pytest.mark.parametrize(
    "event",
    [
        wire.SendPacket(dest=b"short", payload=b""),
        wire.RecvPacket(src=A, payload=b"x" * (wire.MAX_PACKET_BYTES + 1)),
        wire.ForwardPacket(src=A, dest=b"", payload=b""),
        wire.ServerKey(public_key=A, challenge=b"short"),
        wire.ClientInfo(client_key=A, nonce=b"short", sealed=b""),
        wire.ServerInfo(nonce=b"", sealed=b""),
        wire.PeerGone(peer=b"", reason=wire.PeerGoneReason.NOT_HERE),
        wire.PeerPresent(peer=b""),
        wire.ClosePeer(peer=b""),
        wire.Ping(data=b"1"),
        wire.Restarting(reconnect_in_ms=-1, try_for_ms=0),
        wire.Restarting(reconnect_in_ms=0, try_for_ms=2**32),
        wire.PacketsDropped(reason=wire.DropCode.QUEUE_FULL, count=2**32),
        wire.ForwardPackets(src=A, dest=B, payloads=()),
        wire.ForwardPackets(src=A, dest=B, payloads=(bytes(40_000), bytes(40_000))),
        wire.ForwardRun(src=A, dest=B, frames=b""),
        wire.ForwardRun(src=A, dest=B, frames=hdr(5, 33) + B + b"p"),
        wire.ForwardRun(src=A, dest=B, frames=(hdr(5, 32 + 40_000) + A + bytes(40_000)) * 2),
    ],
    ids=lambda e: type(e).__name__,
)
def test_encoding_a_bad_event_is_a_local_error(event: wire.Event) -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode(event)


def test_encoding_a_non_event_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode("not an event")  # type: ignore[arg-type]


def test_largest_packet_fits_the_default_limit() -> None:
    ev = wire.ForwardPacket(src=A, dest=B, payload=b"z" * wire.MAX_PACKET_BYTES)
    dec = FrameDecoder()
    dec.receive_data(wire.encode(ev))
    assert dec.next_event() == ev


def test_need_data_repr() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert CloseReason.WRITE_TIMEOUT.label == "write_timeout"


# ---- Hypothesis ------------------------------------------------------------

keys = st.binary(min_size=32, max_size=32)
payloads = st.binary(max_size=2048)
ping_data = st.binary(min_size=8, max_size=8)
u32 = st.integers(min_value=0, max_value=2**32 - 1)

events = st.one_of(
    st.builds(wire.ServerKey, public_key=keys, challenge=keys),
    st.builds(
        wire.ClientInfo, client_key=keys, nonce=st.binary(min_size=24, max_size=24), sealed=payloads
    ),
    st.builds(wire.ServerInfo, nonce=st.binary(min_size=24, max_size=24), sealed=payloads),
    st.builds(wire.SendPacket, dest=keys, payload=payloads),
    st.builds(wire.RecvPacket, src=keys, payload=payloads),
    st.builds(wire.ForwardPacket, src=keys, dest=keys, payload=payloads),
    st.builds(wire.KeepAlive),
    st.builds(wire.NotePreferred, preferred=st.booleans()),
    st.builds(wire.PeerGone, peer=keys, reason=st.sampled_from(wire.PeerGoneReason)),
    st.builds(wire.PeerPresent, peer=keys),
    st.builds(wire.WatchConns),
    st.builds(wire.ClosePeer, peer=keys),
    st.builds(wire.Ping, data=ping_data),
    st.builds(wire.Pong, data=ping_data),
    st.builds(wire.Health, problem=st.text(max_size=100)),
    st.builds(wire.Restarting, reconnect_in_ms=u32, try_for_ms=u32),
    st.builds(
        wire.ForwardPackets,
        src=keys,
        dest=keys,
        payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=5).map(tuple),
    ),
    st.builds(wire.PacketsDropped, reason=st.sampled_from(wire.DropCode), count=u32),
    st.builds(wire.PacketsDroppedFor, src=keys, reason=st.sampled_from(wire.DropCode), count=u32),
    keys.flatmap(
        lambda src: st.builds(
            wire.ForwardRun,
            src=st.just(src),
            dest=keys,
            frames=st.lists(st.binary(max_size=300), min_size=1, max_size=5).map(
                lambda ps: b"".join(hdr(5, 32 + len(p)) + src + p for p in ps)
            ),
        )
    ),
)


@given(st.lists(events, max_size=20), st.lists(st.integers(min_value=1, max_value=300), min_size=1))
def test_round_trip_any_split(evs: list[wire.Event], cuts: list[int]) -> None:
    stream = b"".join(wire.encode(e) for e in evs)
    dec = FrameDecoder()
    got: list[wire.Event] = []
    pos = 0
    i = 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        dec.receive_data(stream[pos : pos + n])
        pos += n
        i += 1
        while (ev := dec.next_event()) is not NEED_DATA:
            got.append(ev)
    assert got == evs


@given(st.binary(max_size=4096))
def test_fuzz_decoder_never_crashes_otherwise(data: bytes) -> None:
    dec = FrameDecoder(max_body=1024)
    dec.receive_data(data)
    try:
        while dec.next_event() is not NEED_DATA:
            pass
    except RemoteProtocolError as exc:
        assert isinstance(exc.reason, CloseReason)


@given(st.binary(max_size=4096), st.integers(min_value=1, max_value=64))
def test_fuzz_split_never_crashes_otherwise(data: bytes, step: int) -> None:
    dec = FrameDecoder(max_body=1024)
    try:
        for i in range(0, len(data), step):
            dec.receive_data(data[i : i + step])
            for ftype, body in dec.split():
                assert isinstance(ftype, int)
                assert len(body) <= 1024
    except RemoteProtocolError as exc:
        assert exc.reason is CloseReason.FRAME_TOO_LARGE


def test_packets_dropped_reason_from_a_newer_relay_reads_as_other() -> None:
    """An unknown reason is OTHER (the count still counts); bytes past the count are ignored."""
    body = b"\x7f" + struct.pack(">I", 9) + b"later"
    assert wire.decode_body(FrameType.PACKETS_DROPPED, body) == wire.PacketsDropped(
        reason=wire.DropCode.OTHER, count=9
    )


# ---- relay_split: runs of packets, rewritten in place ---------------------

S = bytes([9] * 32)


def send(dest: bytes, payload: bytes) -> bytes:
    return wire.encode(wire.SendPacket(dest=dest, payload=payload))


def recv(src: bytes, payload: bytes) -> bytes:
    return wire.encode(wire.RecvPacket(src=src, payload=payload))


def test_relay_split_gathers_consecutive_packets_to_one_destination_into_a_run() -> None:
    ping = wire.encode(wire.Ping(data=b"12345678"))
    dec = FrameDecoder()
    dec.receive_data(
        send(A, b"1") + send(A, b"22") + send(B, b"3") + ping + send(B, b"4") + send(B, b"")
    )
    assert dec.relay_split(S) == [
        (FrameType.SEND_PACKET, 2, recv(S, b"1") + recv(S, b"22"), A),
        (FrameType.SEND_PACKET, 1, recv(S, b"3"), B),
        (FrameType.PING, 1, b"12345678", b""),
        (FrameType.SEND_PACKET, 2, recv(S, b"4") + recv(S, b""), B),
    ]
    assert dec.buffered == 0


def test_run_payloads_are_the_packets_of_a_run() -> None:
    assert wire.run_payloads(recv(S, b"1") + recv(S, b"") + recv(S, b"333")) == [b"1", b"", b"333"]
    assert wire.run_payloads(b"") == []


frames_to_route = st.lists(
    st.one_of(
        st.builds(send, st.sampled_from([A, B, C + bytes(8)]), st.binary(max_size=40)),
        st.just(wire.encode(wire.Ping(data=b"12345678"))),
        st.just(wire.encode(wire.KeepAlive())),
    ),
    max_size=30,
)


@given(
    frames_to_route,
    st.one_of(st.none(), st.integers(min_value=1, max_value=8)),
    st.one_of(st.none(), st.integers(min_value=1, max_value=200)),
    st.integers(min_value=0, max_value=20),
)
def test_relay_split_is_split_with_each_packet_turned_into_what_the_relay_delivers(
    frames: list[bytes], max_frames: int | None, max_bytes: int | None, cut: int
) -> None:
    """Taken in slices, the runs hold exactly split()'s frames, each SendPacket as the
    RecvPacket from the sender; every slice keeps the bounds; no run mixes destinations."""
    stream = b"".join(frames)
    stream = stream[: len(stream) - cut]  # a partial frame at the end stays buffered
    whole, sliced = FrameDecoder(), FrameDecoder()
    whole.receive_data(stream)
    sliced.receive_data(stream)
    expected = []
    for ftype, body in whole.split():
        if ftype == FrameType.SEND_PACKET:
            expected.append((FrameType.SEND_PACKET, body[:32], recv(S, body[32:])))
        else:
            expected.append((ftype, b"", body))
    got = []
    while part := sliced.relay_split(S, max_frames, max_bytes):
        assert max_frames is None or sum(count for _, count, _, _ in part) <= max_frames
        size = sum(
            len(data) if ftype == FrameType.SEND_PACKET else wire.HEADER_BYTES + len(data)
            for ftype, _, data, _ in part
        )
        assert max_bytes is None or size <= max_bytes or sum(c for _, c, _, _ in part) == 1
        for ftype, count, data, dest in part:
            if ftype != FrameType.SEND_PACKET:
                assert count == 1
                got.append((ftype, dest, data))
                continue
            payloads = wire.run_payloads(data)
            assert len(payloads) == count
            # One copy per run: every packet of it, rewritten, back to back.
            assert data == b"".join(recv(S, p) for p in payloads)
            got.extend((ftype, dest, recv(S, p)) for p in payloads)
    assert got == expected
    assert sliced.buffered == whole.buffered


@pytest.mark.parametrize(
    ("length", "reason", "message"),
    [
        (3, CloseReason.BAD_FRAME, "SendPacket body of 3 bytes has no destination"),
        (
            32 + wire.MAX_PACKET_BYTES + 1,
            CloseReason.FRAME_TOO_LARGE,
            f"packet of {wire.MAX_PACKET_BYTES + 1} bytes is over the limit of"
            f" {wire.MAX_PACKET_BYTES}",
        ),
    ],
)
def test_relay_split_delivers_packets_before_a_bad_send_packet_then_fails(
    length: int, reason: CloseReason, message: str
) -> None:
    dec = FrameDecoder(max_body=wire.MAX_FRAME_BODY)
    dec.receive_data(send(A, b"ok") + hdr(FrameType.SEND_PACKET, length) + bytes(length))
    assert dec.relay_split(S) == [(FrameType.SEND_PACKET, 1, recv(S, b"ok"), A)]
    for _ in range(2):  # broken for good
        with pytest.raises(RemoteProtocolError) as info:
            dec.relay_split(S)
        assert info.value.reason is reason
        assert str(info.value) == message
    assert dec.error is info.value


def test_relay_split_fails_on_an_oversize_header_alone() -> None:
    dec = FrameDecoder(max_body=100)
    dec.receive_data(hdr(4, 101))
    with pytest.raises(RemoteProtocolError) as info:
        dec.relay_split(S)
    assert info.value.reason is CloseReason.FRAME_TOO_LARGE


def test_relay_split_wants_a_whole_source_key() -> None:
    dec = FrameDecoder()
    dec.receive_data(send(A, b"x"))
    with pytest.raises(ValueError):
        dec.relay_split(S[:31])


@given(st.binary(max_size=4096), st.integers(min_value=1, max_value=64))
def test_fuzz_relay_split_never_crashes_otherwise(data: bytes, step: int) -> None:
    dec = FrameDecoder(max_body=1024)
    try:
        for i in range(0, len(data), step):
            dec.receive_data(data[i : i + step])
            for ftype, count, frames, dest in dec.relay_split(S, 16, 512):
                assert count >= 1
                if ftype == FrameType.SEND_PACKET:
                    assert len(dest) == 32 and len(wire.run_payloads(frames)) == count
    except RemoteProtocolError as exc:
        assert exc.reason in (CloseReason.FRAME_TOO_LARGE, CloseReason.BAD_FRAME)


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        (b"", "no packet"),
        (hdr(5, 33) + A, "ends inside a frame"),
        (hdr(5, 33) + A + b"p" + b"\x05\x00", "ends inside a frame"),
        (hdr(4, 33) + A + b"p", "not a RecvPacket"),
        (hdr(5, 33) + B + b"p", "not a RecvPacket from its source"),
        (hdr(5, 31) + A[:31], "ends inside a frame"),
        (hdr(5, 34) + A + b"p", "ends inside a frame"),
        (hdr(5, 32 + wire.MAX_PACKET_BYTES + 1) + A + bytes(wire.MAX_PACKET_BYTES + 1), "not a"),
    ],
)
def test_a_forward_run_that_is_not_whole_recv_packets_from_its_source_is_refused(
    frames: bytes, why: str
) -> None:
    with pytest.raises(wire.RemoteProtocolError, match=why):
        wire.count_run(A + B + frames)
    dec = wire.FrameDecoder()
    dec.receive_data(hdr(0x18, 64 + len(frames)) + A + B + frames)
    with pytest.raises(wire.RemoteProtocolError):
        dec.next_event()


def test_count_run_counts_the_packets() -> None:
    frames = b"".join(hdr(5, 32 + n) + A + bytes(n) for n in (0, 1, 1200))
    assert wire.count_run(A + B + frames) == 3
