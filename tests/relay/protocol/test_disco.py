"""Disco messages: exact plaintext both ways, sealing, forgery and replay, fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.protocol import disco
from relay.protocol.disco import CallMeMaybe, DiscoCodec, DiscoError, Ping, Pong
from relay.protocol.keys import PrivateKey

NODE = PrivateKey.generate().public
TXID = bytes(range(12))
V4 = bytes(10) + b"\xff\xff"

TABLE = [
    (Ping(TXID, NODE), b"\x01\x01" + TXID + NODE.raw),
    (
        Pong(TXID, ("192.0.2.7", 41641)),
        b"\x02\x01" + TXID + V4 + bytes([192, 0, 2, 7]) + b"\xa2\xa9",
    ),
    (
        Pong(TXID, ("2001:db8::1", 1)),
        b"\x02\x01" + TXID + bytes.fromhex("20010db8000000000000000000000001") + b"\x00\x01",
    ),
    (
        CallMeMaybe((("10.0.0.1", 1), ("192.0.2.7", 2))),
        b"\x03\x01"
        + V4
        + bytes([10, 0, 0, 1])
        + b"\x00\x01"
        + V4
        + bytes([192, 0, 2, 7])
        + b"\x00\x02",
    ),
    (CallMeMaybe(()), b"\x03\x01"),
]


@pytest.mark.parametrize(("msg", "plain"), TABLE, ids=lambda v: type(v).__name__)
def test_plaintext_both_ways(msg: disco.Message, plain: bytes) -> None:
    assert disco.encode_plain(msg) == plain
    assert disco.decode_plain(plain) == msg


@pytest.mark.parametrize(
    "plain",
    [b"", b"\x01", b"\x01\x01short", b"\x02\x01" + TXID, b"\x03\x01" + b"x" * 5, b"\x09\x01"],
)
def test_malformed_plaintext(plain: bytes) -> None:
    with pytest.raises(DiscoError):
        disco.decode_plain(plain)


def test_bad_txid_is_refused_on_encode() -> None:
    with pytest.raises(ValueError):
        disco.encode_plain(Ping(b"short", NODE))
    with pytest.raises(ValueError):
        disco.encode_plain(Pong(b"short", ("192.0.2.1", 1)))


def test_seal_open_and_replay_is_ignored() -> None:
    alice, bob = DiscoCodec(PrivateKey.generate()), DiscoCodec(PrivateKey.generate())
    wire = alice.seal(bob.public, Ping(TXID, NODE))
    assert disco.is_disco(wire) and not disco.is_data(wire)
    sender, msg = bob.open(wire)
    assert sender == alice.public and msg == Ping(TXID, NODE)
    with pytest.raises(DiscoError, match="replayed"):
        bob.open(wire)


def test_forged_or_misdirected_messages_are_ignored() -> None:
    alice, bob, eve = (DiscoCodec(PrivateKey.generate()) for _ in range(3))
    wire = alice.seal(bob.public, CallMeMaybe((("192.0.2.1", 5),)))
    with pytest.raises(DiscoError, match="did not open"):
        eve.open(wire)  # not for eve
    # eve claims to be alice: she cannot seal with alice's key.
    forged = bytearray(eve.seal(bob.public, CallMeMaybe((("203.0.113.9", 5),))))
    forged[6:38] = alice.public.raw
    with pytest.raises(DiscoError, match="did not open"):
        bob.open(bytes(forged))
    tampered = bytearray(wire)
    tampered[-1] ^= 1
    with pytest.raises(DiscoError):
        bob.open(bytes(tampered))
    with pytest.raises(DiscoError):
        bob.open(b"RMDSC\x01" + b"short")


def test_data_envelope() -> None:
    packet = disco.encode_data(NODE, b"sealed bytes")
    assert disco.is_data(packet) and not disco.is_disco(packet)
    assert disco.decode_data(packet) == (NODE, b"sealed bytes")
    with pytest.raises(DiscoError):
        disco.decode_data(b"RMDAT\x01short")


@given(st.binary(max_size=300))
def test_fuzz_open(data: bytes) -> None:
    codec = DiscoCodec(PrivateKey.generate())
    for candidate in (data, disco.DISCO_MAGIC + data):
        with contextlib.suppress(DiscoError):
            codec.open(candidate)


@given(st.binary(max_size=300))
def test_fuzz_plaintext(data: bytes) -> None:
    with contextlib.suppress(DiscoError):
        disco.decode_plain(data)


_ADDRS = st.ip_addresses(v=4) | st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)


@given(st.lists(st.tuples(_ADDRS, st.integers(0, 65535)), max_size=8))
def test_call_me_maybe_round_trip(eps: list[tuple[object, int]]) -> None:
    msg = CallMeMaybe(tuple((str(ip), port) for ip, port in eps))
    assert disco.decode_plain(disco.encode_plain(msg)) == msg
