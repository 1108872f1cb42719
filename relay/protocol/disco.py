"""Disco: the small sealed messages peers use to find a direct path. Sans-IO.

Every client has a disco key (Curve25519, separate from its node key, so
path discovery never touches the key that seals data). Disco messages travel
through the relays (as packet payloads) and directly over UDP, always in the
same envelope::

    magic "RMDSC\\x01" (6) | sender disco key (32) | nonce (24) | box(plaintext)

The box is sealed from the sender's disco key to the receiver's, so nobody
else can read or forge one. A receiver keeps the nonces it has accepted
lately and ignores a message whose nonce it has seen: a replay.

Plaintext: type (1) | version (1) | body:

==========  ====  ===========================================================
Ping        0x01  transaction id (12) | sender node key (32)
Pong        0x02  transaction id (12) | the address the Ping came from:
                  IP (16, IPv4 as ::ffff:a.b.c.d) | port (2)
CallMeMaybe 0x03  n times (IP (16) | port (2)): the sender's endpoints
==========  ====  ===========================================================

Data sent directly over UDP uses another envelope, so a receiver can tell the
two apart and knows which peer sent it::

    magic "RMDAT\\x01" (6) | sender node key (32) | payload sealed node-to-node

Before any of that, a peer must learn the other's disco key. It does so
through the relay with an Intro, sealed node key to node key (the relay's
RecvPacket source names the sender, the box proves it)::

    magic "RMDKY\\x01" (6) | nonce (24) | box(flags (1) | disco key (32) | n x addr (18))

Flag bit 0: the sender does not know our disco key yet; answer with an Intro.
The addresses are the sender's endpoints (at most 32), as in CallMeMaybe.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass

import nacl.exceptions

from relay.protocol.keys import BoxCache, NodeKey, PrivateKey

__all__ = [
    "DATA_MAGIC",
    "DISCO_MAGIC",
    "INTRO_MAGIC",
    "CallMeMaybe",
    "DiscoCodec",
    "DiscoError",
    "Intro",
    "Ping",
    "Pong",
    "decode_data",
    "decode_intro",
    "encode_data",
    "encode_intro",
    "is_data",
    "is_disco",
    "is_intro",
]

DISCO_MAGIC = b"RMDSC\x01"
DATA_MAGIC = b"RMDAT\x01"
INTRO_MAGIC = b"RMDKY\x01"
MAX_INTRO_ENDPOINTS = 32
_VERSION = 1
_KEY = 32
_NONCE = 24
_TXID = 12
_ADDR = struct.Struct(">16sH")
#: Boxes kept per disco key, one per peer talked to recently.
_BOX_CACHE_SIZE = 4096


class DiscoError(Exception):
    """Not a disco message we accept: malformed, forged, replayed or not for us."""


class MsgType(enum.IntEnum):
    PING = 0x01
    PONG = 0x02
    CALL_ME_MAYBE = 0x03


Addr = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Ping:
    txid: bytes
    node_key: NodeKey


@dataclass(frozen=True, slots=True)
class Pong:
    txid: bytes
    src: Addr


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    endpoints: tuple[Addr, ...]


Message = Ping | Pong | CallMeMaybe


@dataclass(frozen=True, slots=True)
class Intro:
    """My disco key and endpoints; ``reply``: I do not know yours yet, send me yours."""

    disco_key: NodeKey
    endpoints: tuple[Addr, ...]
    reply: bool


def new_txid() -> bytes:
    return os.urandom(_TXID)


def _pack_addr(addr: Addr) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    v6 = (
        ip
        if isinstance(ip, ipaddress.IPv6Address)
        else ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
    )
    return _ADDR.pack(v6.packed, addr[1])


def _unpack_addr(data: bytes) -> Addr:
    raw, port = _ADDR.unpack(data)
    ip = ipaddress.IPv6Address(raw)
    return (str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)), port


def encode_plain(msg: Message) -> bytes:
    match msg:
        case Ping(txid=txid, node_key=key):
            if len(txid) != _TXID:
                raise ValueError("a transaction id is 12 bytes")
            return bytes([MsgType.PING, _VERSION]) + txid + key.raw
        case Pong(txid=txid, src=src):
            if len(txid) != _TXID:
                raise ValueError("a transaction id is 12 bytes")
            return bytes([MsgType.PONG, _VERSION]) + txid + _pack_addr(src)
        case CallMeMaybe(endpoints=eps):
            return bytes([MsgType.CALL_ME_MAYBE, _VERSION]) + b"".join(_pack_addr(e) for e in eps)
    raise ValueError(f"not a disco message: {msg!r}")


def decode_plain(data: bytes) -> Message:
    if len(data) < 2:
        raise DiscoError("empty disco message")
    mtype, body = data[0], data[2:]
    try:
        if mtype == MsgType.PING and len(body) >= _TXID + _KEY:
            return Ping(body[:_TXID], NodeKey(body[_TXID : _TXID + _KEY]))
        if mtype == MsgType.PONG and len(body) >= _TXID + _ADDR.size:
            return Pong(body[:_TXID], _unpack_addr(body[_TXID : _TXID + _ADDR.size]))
        if mtype == MsgType.CALL_ME_MAYBE and len(body) % _ADDR.size == 0:
            return CallMeMaybe(
                tuple(
                    _unpack_addr(body[i : i + _ADDR.size]) for i in range(0, len(body), _ADDR.size)
                )
            )
    except ValueError as exc:
        raise DiscoError(f"malformed disco body: {exc}") from None
    raise DiscoError(f"unknown or short disco message (type 0x{mtype:02x})")


def is_intro(data: bytes) -> bool:
    return data[: len(INTRO_MAGIC)] == INTRO_MAGIC


def encode_intro(intro: Intro) -> bytes:
    """The plaintext of an Intro (the caller seals it node to node and prefixes INTRO_MAGIC)."""
    if len(intro.endpoints) > MAX_INTRO_ENDPOINTS:
        raise ValueError(f"an Intro carries at most {MAX_INTRO_ENDPOINTS} endpoints")
    return (
        bytes([1 if intro.reply else 0])
        + intro.disco_key.raw
        + b"".join(_pack_addr(e) for e in intro.endpoints)
    )


def decode_intro(plain: bytes) -> Intro:
    body = plain[1 + _KEY :]
    if (
        len(plain) < 1 + _KEY
        or len(body) % _ADDR.size
        or len(body) // _ADDR.size > MAX_INTRO_ENDPOINTS
    ):
        raise DiscoError("malformed Intro")
    try:
        eps = tuple(_unpack_addr(body[i : i + _ADDR.size]) for i in range(0, len(body), _ADDR.size))
    except ValueError as exc:
        raise DiscoError(f"malformed Intro: {exc}") from None
    return Intro(NodeKey(plain[1 : 1 + _KEY]), eps, bool(plain[0] & 1))


def is_disco(data: bytes) -> bool:
    return data[: len(DISCO_MAGIC)] == DISCO_MAGIC


def is_data(data: bytes) -> bool:
    return data[: len(DATA_MAGIC)] == DATA_MAGIC


def encode_data(sender: NodeKey, sealed: bytes) -> bytes:
    return DATA_MAGIC + sender.raw + sealed


def decode_data(data: bytes) -> tuple[NodeKey, bytes]:
    if not is_data(data) or len(data) < len(DATA_MAGIC) + _KEY:
        raise DiscoError("not a direct data packet")
    start = len(DATA_MAGIC)
    return NodeKey(data[start : start + _KEY]), data[start + _KEY :]


class DiscoCodec:
    """Seals and opens disco messages for one disco key, refusing replays."""

    def __init__(self, key: PrivateKey, *, replay_window: int = 4096) -> None:
        self.key = key
        self._window = replay_window
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._boxes = BoxCache(key, size=_BOX_CACHE_SIZE)

    @property
    def public(self) -> NodeKey:
        return self.key.public

    def seal(self, peer: NodeKey, msg: Message) -> bytes:
        sealed = self._boxes.get(peer).encrypt(encode_plain(msg))
        return DISCO_MAGIC + self.key.public.raw + bytes(sealed)

    def open(self, data: bytes) -> tuple[NodeKey, Message]:
        """(sender's disco key, message). Raises DiscoError for anything not to accept."""
        head = len(DISCO_MAGIC)
        if not is_disco(data) or len(data) < head + _KEY + _NONCE + 16:
            raise DiscoError("not a disco message")
        sender = NodeKey(data[head : head + _KEY])
        nonce = data[head + _KEY : head + _KEY + _NONCE]
        try:
            plain = self._boxes.get(sender).decrypt(data[head + _KEY :])
        except (nacl.exceptions.CryptoError, ValueError) as exc:
            raise DiscoError("disco box did not open (forged, or not for us)") from exc
        seen_key = sender.raw + nonce
        if seen_key in self._seen:
            raise DiscoError("replayed disco message")
        self._seen[seen_key] = None
        if len(self._seen) > self._window:
            self._seen.popitem(last=False)
        return sender, decode_plain(plain)
