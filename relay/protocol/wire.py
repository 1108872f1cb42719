"""The relay wire protocol: a sans-IO frame codec.

No sockets and no trio here. Bytes go in with :meth:`FrameDecoder.receive_data`,
events come out of :meth:`FrameDecoder.next_event`, and :func:`encode` turns an
event into bytes. docs/PROTOCOL.md is the full specification; this module is
its reference implementation.

Theory of operation
-------------------
Every frame is::

    +------+----------------+------------------+
    | type | length (u32 BE)| body (length B)  |
    | 1 B  | 4 B            |                  |
    +------+----------------+------------------+

Over a WebSocket (subprotocol ``derp``) frames form one byte stream: a binary
message may carry many frames and a frame may span messages. That is what
lets both ends coalesce everything queued into one message.

Frame bodies (all integers big-endian, keys are 32-byte Curve25519 public keys):

=====  ==============  ======================================================
type   name            body
=====  ==============  ======================================================
0x01   ServerKey       magic "DERP🔑" (8 B) | relay key (32) | challenge (32)
0x02   ClientInfo      client key (32) | nonce (24) | box(JSON) to relay key
0x03   ServerInfo      nonce (24) | box(JSON) to client key
0x04   SendPacket      destination key (32) | payload (0..65536)
0x05   RecvPacket      source key (32) | payload (0..65536)
0x06   KeepAlive       empty
0x07   NotePreferred   1 B: 0x01 this is my home relay, 0x00 it is not
0x08   PeerGone        peer key (32) | reason (1 B, :class:`PeerGoneReason`)
0x09   PeerPresent     peer key (32)
0x0a   ForwardPacket   source key (32) | destination key (32) | payload
0x10   WatchConns      empty
0x11   ClosePeer       peer key (32)
0x12   Ping            8 opaque bytes
0x13   Pong            the 8 bytes of the Ping it answers
0x14   Health          UTF-8 text; empty means healthy again
0x15   Restarting      reconnect in (u32 ms) | try for (u32 ms)
0x16   PacketsDropped  reason (1 B, :class:`DropCode`) | count (u32)
0x17   ForwardPackets  source key (32) | dest key (32) | per packet: length (u32) | payload
0x18   ForwardRun      source key (32) | dest key (32) | RecvPacket frames from that source
0x19   DroppedFor      source key (32) | reason (1 B, :class:`DropCode`) | count (u32)
=====  ==============  ======================================================

A decoder skips frames of a type it does not know (so new frame types can be
added without breaking old peers) and counts them in ``skipped_frames``.
A length above the decoder's limit is an error before any of the body is
buffered, so a hostile peer cannot make us hold more than one frame's worth.

The hot path of a relay does not need event objects. A SendPacket and the
RecvPacket a relay delivers for it have the same header length and the same
layout (a key, then the payload), so :meth:`FrameDecoder.relay_split` turns
a run of consecutive SendPackets to one destination into the RecvPackets
from their sender *in place* in its buffer (the type byte and the key of each
frame are overwritten) and hands the run out as one ``bytes``: one copy per
run, whatever the number of packets in it. :func:`frame_header` builds the 5
header bytes for the other paths.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "FRAME_HEADER",
    "HEADER_BYTES",
    "KEY_BYTES",
    "MAGIC",
    "MAX_CLIENT_FRAME_BODY",
    "MAX_FRAME_BODY",
    "MAX_HANDSHAKE_BODY",
    "MAX_PACKET_BYTES",
    "MAX_PREAUTH_MESSAGE_BYTES",
    "NEED_DATA",
    "PING_BYTES",
    "PROTOCOL_VERSION",
    "SUBPROTOCOL",
    "ClientInfo",
    "ClosePeer",
    "CloseReason",
    "DropCode",
    "Event",
    "ForwardPacket",
    "ForwardPackets",
    "ForwardRun",
    "FrameDecoder",
    "FrameType",
    "Health",
    "KeepAlive",
    "LocalProtocolError",
    "NeedData",
    "NotePreferred",
    "PacketsDropped",
    "PacketsDroppedFor",
    "PeerGone",
    "PeerGoneReason",
    "PeerPresent",
    "Ping",
    "Pong",
    "ProtocolError",
    "RecvPacket",
    "RemoteProtocolError",
    "Restarting",
    "SendPacket",
    "ServerInfo",
    "ServerKey",
    "WatchConns",
    "bad_send_packet",
    "count_run",
    "decode_body",
    "encode",
    "frame_header",
    "run_payloads",
    "split_packets",
]

PROTOCOL_VERSION: Final = 2
SUBPROTOCOL: Final = "derp"
MAGIC: Final = "DERP🔑".encode()
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 24
CHALLENGE_BYTES: Final = 32
PING_BYTES: Final = 8
HEADER_BYTES: Final = 5
MAX_PACKET_BYTES: Final = 64 * 1024
#: The largest body any frame may have: a ForwardPacket of the largest packet (65,600).
#: A relay allows it only on mesh connections.
MAX_FRAME_BODY: Final = 2 * KEY_BYTES + MAX_PACKET_BYTES
#: The largest body on a client connection: a SendPacket of the largest packet (65,568).
#: Clients may not send ForwardPacket, so a longer frame is refused at its header.
MAX_CLIENT_FRAME_BODY: Final = KEY_BYTES + MAX_PACKET_BYTES
#: Handshake frames are small; a peer that claims more is not speaking this protocol.
MAX_HANDSHAKE_BODY: Final = 4096
#: The largest WebSocket message a relay accepts before its ServerInfo: a ClientInfo
#: at its limit (4,101 bytes) with room to spare. Bounds what a connection that has
#: not proved a key can make the relay hold.
MAX_PREAUTH_MESSAGE_BYTES: Final = 8192

#: The frame header, type (1) | body length (4, big-endian), as a Struct: hot paths
#: bind its ``pack`` once instead of calling :func:`frame_header` per packet.
FRAME_HEADER: Final = struct.Struct(">BI")
_RESTARTING = struct.Struct(">II")
_DROPPED = struct.Struct(">BI")
_LEN = struct.Struct(">I")


class FrameType(enum.IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15
    PACKETS_DROPPED = 0x16
    FORWARD_PACKETS = 0x17
    FORWARD_RUN = 0x18
    DROPPED_FOR = 0x19


class DropCode(enum.IntEnum):
    """Why a relay dropped packets a client sent (a PacketsDropped frame)."""

    #: A reason this version does not know (a newer relay's).
    OTHER = 0x00
    #: The destination's queue at the relay was full (in packets or in bytes).
    QUEUE_FULL = 0x01
    #: All queues of the relay together were full.
    RELAY_QUEUE_FULL = 0x02
    #: The destination was disconnecting.
    DEST_CLOSING = 0x03
    #: The queue of the mesh link towards the destination's relay was full.
    MESH_QUEUE_FULL = 0x04


class PeerGoneReason(enum.IntEnum):
    #: The peer was connected here and went away.
    DISCONNECTED = 0x00
    #: A packet was sent to a peer that this relay does not know.
    NOT_HERE = 0x01


class CloseReason(enum.IntEnum):
    """Why a relay (or client) closes a connection: the WebSocket close code.

    The close message's reason text is the lower-case name, then ``": "`` and
    a detail. Metrics count closes by the lower-case name (the relay adds a few
    labels of its own for connections that never got a close code).
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    #: The peer broke RFC 6455 (an unmasked client frame, a bad opcode or length, ...).
    PROTOCOL_ERROR = 1002
    #: A Close frame whose reason is not UTF-8.
    INVALID_PAYLOAD = 1007
    #: A WebSocket message over the receiver's limit (RFC 6455's "message too big").
    MESSAGE_TOO_BIG = 1009
    REPLACED = 4001
    BAD_FRAME = 4002
    FRAME_TOO_LARGE = 4003
    HANDSHAKE_TIMEOUT = 4004
    BAD_HANDSHAKE = 4005
    BAD_CHALLENGE = 4006
    UNAUTHORIZED = 4007
    WRITE_TIMEOUT = 4008
    UNEXPECTED_FRAME = 4009
    TEXT_MESSAGE = 4010
    CLOSED_BY_PEER = 4011

    @property
    def label(self) -> str:
        return self.name.lower()


class ProtocolError(Exception):
    """The protocol was broken; ``reason`` says how to close the connection."""

    def __init__(self, msg: str, reason: CloseReason = CloseReason.BAD_FRAME) -> None:
        super().__init__(msg)
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class NeedData:
    """Sentinel type: :meth:`FrameDecoder.next_event` needs more bytes."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


# Events. Keys are raw 32-byte strings here; relay.keys wraps them for humans.

_EV = {"frozen": True, "slots": True, "kw_only": True}


@dataclass(**_EV)
class ServerKey:
    public_key: bytes
    challenge: bytes


@dataclass(**_EV)
class ClientInfo:
    client_key: bytes
    nonce: bytes
    sealed: bytes


@dataclass(**_EV)
class ServerInfo:
    nonce: bytes
    sealed: bytes


@dataclass(**_EV)
class SendPacket:
    dest: bytes
    payload: bytes


@dataclass(**_EV)
class RecvPacket:
    src: bytes
    payload: bytes


@dataclass(**_EV)
class ForwardPacket:
    src: bytes
    dest: bytes
    payload: bytes


@dataclass(**_EV)
class ForwardPackets:
    """A run of packets from one source to one destination, in one mesh frame."""

    src: bytes
    dest: bytes
    payloads: tuple[bytes, ...]


@dataclass(**_EV)
class ForwardRun:
    """A run of packets from one source to one destination, in one mesh frame, as the
    RecvPacket frames the destination is to get (the origin relay's run, verbatim)."""

    src: bytes
    dest: bytes
    frames: bytes


@dataclass(**_EV)
class KeepAlive:
    pass


@dataclass(**_EV)
class NotePreferred:
    preferred: bool


@dataclass(**_EV)
class PeerGone:
    peer: bytes
    reason: PeerGoneReason


@dataclass(**_EV)
class PeerPresent:
    peer: bytes


@dataclass(**_EV)
class WatchConns:
    pass


@dataclass(**_EV)
class ClosePeer:
    peer: bytes


@dataclass(**_EV)
class Ping:
    data: bytes


@dataclass(**_EV)
class Pong:
    data: bytes


@dataclass(**_EV)
class Health:
    problem: str


@dataclass(**_EV)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(**_EV)
class PacketsDropped:
    reason: DropCode
    count: int


@dataclass(**_EV)
class PacketsDroppedFor:
    """Between relays: ``count`` packets from ``src`` (a client of the relay told) were
    dropped at the sending relay, for ``reason``; that relay tells ``src``."""

    src: bytes
    reason: DropCode
    count: int


Event = (
    ServerKey
    | ClientInfo
    | ServerInfo
    | SendPacket
    | RecvPacket
    | ForwardPacket
    | ForwardPackets
    | ForwardRun
    | KeepAlive
    | NotePreferred
    | PeerGone
    | PeerPresent
    | WatchConns
    | ClosePeer
    | Ping
    | Pong
    | Health
    | Restarting
    | PacketsDropped
    | PacketsDroppedFor
)


def frame_header(frame_type: int, length: int) -> bytes:
    """The 5 bytes that start a frame of ``frame_type`` with a body of ``length`` bytes."""
    return FRAME_HEADER.pack(frame_type, length)


def _check_key(name: str, value: bytes) -> None:
    if len(value) != KEY_BYTES:
        raise LocalProtocolError(f"{name} must be {KEY_BYTES} bytes, got {len(value)}")


def _check_payload(payload: bytes) -> None:
    if len(payload) > MAX_PACKET_BYTES:
        raise LocalProtocolError(
            f"packet of {len(payload)} bytes is over the limit of {MAX_PACKET_BYTES}",
            CloseReason.FRAME_TOO_LARGE,
        )


def _body(event: Event) -> tuple[FrameType, bytes]:
    match event:
        case SendPacket(dest=dest, payload=payload):
            _check_key("dest", dest)
            _check_payload(payload)
            return FrameType.SEND_PACKET, dest + payload
        case RecvPacket(src=src, payload=payload):
            _check_key("src", src)
            _check_payload(payload)
            return FrameType.RECV_PACKET, src + payload
        case ForwardPacket(src=src, dest=dest, payload=payload):
            _check_key("src", src)
            _check_key("dest", dest)
            _check_payload(payload)
            return FrameType.FORWARD_PACKET, src + dest + payload
        case ServerKey(public_key=key, challenge=challenge):
            _check_key("public_key", key)
            if len(challenge) != CHALLENGE_BYTES:
                raise LocalProtocolError(f"challenge must be {CHALLENGE_BYTES} bytes")
            return FrameType.SERVER_KEY, MAGIC + key + challenge
        case ClientInfo(client_key=key, nonce=nonce, sealed=sealed):
            _check_key("client_key", key)
            if len(nonce) != NONCE_BYTES:
                raise LocalProtocolError(f"nonce must be {NONCE_BYTES} bytes")
            return FrameType.CLIENT_INFO, key + nonce + sealed
        case ServerInfo(nonce=nonce, sealed=sealed):
            if len(nonce) != NONCE_BYTES:
                raise LocalProtocolError(f"nonce must be {NONCE_BYTES} bytes")
            return FrameType.SERVER_INFO, nonce + sealed
        case KeepAlive():
            return FrameType.KEEP_ALIVE, b""
        case NotePreferred(preferred=preferred):
            return FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00"
        case PeerGone(peer=peer, reason=reason):
            _check_key("peer", peer)
            return FrameType.PEER_GONE, peer + bytes([reason])
        case PeerPresent(peer=peer):
            _check_key("peer", peer)
            return FrameType.PEER_PRESENT, peer
        case WatchConns():
            return FrameType.WATCH_CONNS, b""
        case ClosePeer(peer=peer):
            _check_key("peer", peer)
            return FrameType.CLOSE_PEER, peer
        case Ping(data=data) | Pong(data=data):
            if len(data) != PING_BYTES:
                raise LocalProtocolError(f"ping data must be {PING_BYTES} bytes")
            return (FrameType.PING if isinstance(event, Ping) else FrameType.PONG), data
        case Health(problem=problem):
            return FrameType.HEALTH, problem.encode()
        case Restarting(reconnect_in_ms=reconnect, try_for_ms=try_for):
            if not (0 <= reconnect < 2**32 and 0 <= try_for < 2**32):
                raise LocalProtocolError("restart times must fit in 32 bits")
            return FrameType.RESTARTING, _RESTARTING.pack(reconnect, try_for)
        case ForwardPackets(src=src, dest=dest, payloads=payloads):
            _check_key("src", src)
            _check_key("dest", dest)
            if not payloads:
                raise LocalProtocolError("ForwardPackets carries at least one packet")
            parts = [src, dest]
            for payload in payloads:
                _check_payload(payload)
                parts += (_LEN.pack(len(payload)), payload)
            body = b"".join(parts)
            if len(body) > MAX_FRAME_BODY:
                raise LocalProtocolError(
                    f"ForwardPackets body of {len(body)} bytes is over {MAX_FRAME_BODY}",
                    CloseReason.FRAME_TOO_LARGE,
                )
            return FrameType.FORWARD_PACKETS, body
        case ForwardRun(src=src, dest=dest, frames=frames):
            _check_key("src", src)
            _check_key("dest", dest)
            body = src + dest + frames
            try:
                count_run(body)
            except RemoteProtocolError as exc:
                raise LocalProtocolError(str(exc)) from None
            if len(body) > MAX_FRAME_BODY:
                raise LocalProtocolError(
                    f"ForwardRun body of {len(body)} bytes is over {MAX_FRAME_BODY}",
                    CloseReason.FRAME_TOO_LARGE,
                )
            return FrameType.FORWARD_RUN, body
        case PacketsDropped(reason=reason, count=count):
            if not 0 <= count < 2**32:
                raise LocalProtocolError("a drop count must fit in 32 bits")
            return FrameType.PACKETS_DROPPED, _DROPPED.pack(reason, count)
        case PacketsDroppedFor(src=src, reason=reason, count=count):
            _check_key("src", src)
            if not 0 <= count < 2**32:
                raise LocalProtocolError("a drop count must fit in 32 bits")
            return FrameType.DROPPED_FOR, src + _DROPPED.pack(reason, count)
    raise LocalProtocolError(f"not a frame event: {event!r}")


def encode(event: Event) -> bytes:
    """The bytes of one frame carrying ``event``."""
    frame_type, body = _body(event)
    return FRAME_HEADER.pack(frame_type, len(body)) + body


def _need(frame_type: FrameType, body: bytes, exact: int | None = None, least: int = 0) -> None:
    if exact is not None and len(body) != exact:
        raise RemoteProtocolError(f"{frame_type.name} body must be {exact} bytes, got {len(body)}")
    if len(body) < least:
        raise RemoteProtocolError(
            f"{frame_type.name} body must be at least {least} bytes, got {len(body)}"
        )


def decode_body(frame_type: int, body: bytes) -> Event | None:
    """The event carried by one frame, or None for a type this version does not know."""
    try:
        ft = FrameType(frame_type)
    except ValueError:
        return None
    k = KEY_BYTES
    match ft:
        case FrameType.SEND_PACKET:
            _need(ft, body, least=k)
            return SendPacket(dest=body[:k], payload=body[k:])
        case FrameType.RECV_PACKET:
            _need(ft, body, least=k)
            return RecvPacket(src=body[:k], payload=body[k:])
        case FrameType.FORWARD_PACKET:
            _need(ft, body, least=2 * k)
            return ForwardPacket(src=body[:k], dest=body[k : 2 * k], payload=body[2 * k :])
        case FrameType.SERVER_KEY:
            _need(ft, body, exact=len(MAGIC) + k + CHALLENGE_BYTES)
            if body[: len(MAGIC)] != MAGIC:
                raise RemoteProtocolError(
                    "ServerKey does not start with the magic", CloseReason.BAD_HANDSHAKE
                )
            rest = body[len(MAGIC) :]
            return ServerKey(public_key=rest[:k], challenge=rest[k:])
        case FrameType.CLIENT_INFO:
            _need(ft, body, least=k + NONCE_BYTES)
            return ClientInfo(
                client_key=body[:k], nonce=body[k : k + NONCE_BYTES], sealed=body[k + NONCE_BYTES :]
            )
        case FrameType.SERVER_INFO:
            _need(ft, body, least=NONCE_BYTES)
            return ServerInfo(nonce=body[:NONCE_BYTES], sealed=body[NONCE_BYTES:])
        case FrameType.KEEP_ALIVE:
            return KeepAlive()
        case FrameType.NOTE_PREFERRED:
            _need(ft, body, exact=1)
            return NotePreferred(preferred=body != b"\x00")
        case FrameType.PEER_GONE:
            _need(ft, body, least=k + 1)
            try:
                reason = PeerGoneReason(body[k])
            except ValueError:
                # A reason from a newer peer: the peer is gone all the same.
                reason = PeerGoneReason.DISCONNECTED
            return PeerGone(peer=body[:k], reason=reason)
        case FrameType.PEER_PRESENT:
            _need(ft, body, least=k)
            return PeerPresent(peer=body[:k])
        case FrameType.WATCH_CONNS:
            return WatchConns()
        case FrameType.CLOSE_PEER:
            _need(ft, body, exact=k)
            return ClosePeer(peer=body)
        case FrameType.PING:
            _need(ft, body, exact=PING_BYTES)
            return Ping(data=body)
        case FrameType.PONG:
            _need(ft, body, exact=PING_BYTES)
            return Pong(data=body)
        case FrameType.HEALTH:
            try:
                return Health(problem=body.decode())
            except UnicodeDecodeError:
                raise RemoteProtocolError("Health text is not UTF-8") from None
        case FrameType.RESTARTING:
            _need(ft, body, exact=_RESTARTING.size)
            reconnect, try_for = _RESTARTING.unpack(body)
            return Restarting(reconnect_in_ms=reconnect, try_for_ms=try_for)
        case FrameType.FORWARD_PACKETS:
            _need(ft, body, least=2 * k + _LEN.size)
            return ForwardPackets(
                src=body[:k], dest=body[k : 2 * k], payloads=tuple(split_packets(body))
            )
        case FrameType.FORWARD_RUN:
            count_run(body)
            return ForwardRun(src=body[:k], dest=body[k : 2 * k], frames=body[2 * k :])
        case FrameType.PACKETS_DROPPED:
            # Longer bodies: a newer relay's additions, ignored.
            _need(ft, body, least=_DROPPED.size)
            code, count = _DROPPED.unpack_from(body)
            try:
                drop = DropCode(code)
            except ValueError:
                drop = DropCode.OTHER
            return PacketsDropped(reason=drop, count=count)
        case FrameType.DROPPED_FOR:
            _need(ft, body, least=k + _DROPPED.size)
            code, count = _DROPPED.unpack_from(body, k)
            try:
                drop = DropCode(code)
            except ValueError:
                drop = DropCode.OTHER
            return PacketsDroppedFor(src=body[:k], reason=drop, count=count)
    raise AssertionError(ft)  # pragma: no cover - every FrameType has an arm


def split_packets(body: bytes) -> list[bytes]:
    """The payloads of a ForwardPackets body (its keys skipped); RemoteProtocolError if
    the lengths do not fill it exactly or one is over MAX_PACKET_BYTES."""
    pos = 2 * KEY_BYTES
    end = len(body)
    out = []
    unpack = _LEN.unpack_from
    while pos < end:
        if end - pos < _LEN.size:
            raise RemoteProtocolError("ForwardPackets ends inside a length")
        (n,) = unpack(body, pos)
        pos += _LEN.size
        if n > MAX_PACKET_BYTES or pos + n > end:
            raise RemoteProtocolError(f"ForwardPackets entry of {n} bytes does not fit")
        out.append(body[pos : pos + n])
        pos += n
    if not out:
        raise RemoteProtocolError("ForwardPackets carries no packet")
    return out


def count_run(body: bytes) -> int:
    """How many packets a ForwardRun body carries; RemoteProtocolError unless, after its
    two keys, it is one or more whole RecvPacket frames from its source key."""
    if len(body) < 2 * KEY_BYTES:
        raise RemoteProtocolError(f"ForwardRun body of {len(body)} bytes has no keys")
    src = body[:KEY_BYTES]
    unpack = FRAME_HEADER.unpack_from
    pos = 2 * KEY_BYTES
    end = len(body)
    count = 0
    most = KEY_BYTES + MAX_PACKET_BYTES
    while pos < end:
        if end - pos < HEADER_BYTES + KEY_BYTES:
            raise RemoteProtocolError("ForwardRun ends inside a frame")
        frame_type, length = unpack(body, pos)
        stop = pos + HEADER_BYTES + length
        if stop > end and length <= most:
            raise RemoteProtocolError("ForwardRun ends inside a frame")
        if (
            frame_type != _RECV_TYPE
            or not KEY_BYTES <= length <= most
            or stop > end
            or body[pos + HEADER_BYTES : pos + HEADER_BYTES + KEY_BYTES] != src
        ):
            raise RemoteProtocolError(
                "ForwardRun holds a frame that is not a RecvPacket from its source"
            )
        pos = stop
        count += 1
    if not count:
        raise RemoteProtocolError("ForwardRun carries no packet")
    return count


def run_payloads(frames: bytes) -> list[bytes]:
    """The payloads of consecutive SendPacket or RecvPacket frames (their keys skipped),
    such as a run :meth:`FrameDecoder.relay_split` hands out."""
    out = []
    unpack = FRAME_HEADER.unpack_from
    pos = 0
    end = len(frames)
    while pos < end:
        _, length = unpack(frames, pos)
        start = pos + HEADER_BYTES + KEY_BYTES
        pos += HEADER_BYTES + length
        out.append(frames[start:pos])
    return out


def bad_send_packet(length: int) -> RemoteProtocolError:
    """The error for a SendPacket (or a forwarded packet, keys aside) whose body of
    ``length`` bytes has no destination key or holds a packet over the limit."""
    if length < KEY_BYTES:
        return RemoteProtocolError(f"SendPacket body of {length} bytes has no destination")
    return RemoteProtocolError(
        f"packet of {length - KEY_BYTES} bytes is over the limit of {MAX_PACKET_BYTES}",
        CloseReason.FRAME_TOO_LARGE,
    )


#: Plain ints for the hot loop of relay_split (an IntEnum compares slower).
_SEND_TYPE: Final = 0x04
_RECV_TYPE: Final = 0x05
#: A frame header and the key that starts a SendPacket or RecvPacket body.
_HEADER_AND_KEY = struct.Struct(f">BI{KEY_BYTES}s")


class FrameDecoder:
    """Splits a byte stream into frames.

    ``max_body`` bounds what one frame may claim; a longer one raises
    :class:`RemoteProtocolError` (reason FRAME_TOO_LARGE) as soon as its
    header arrives. After an error the decoder is broken for good: the
    connection must be closed.
    """

    __slots__ = ("_buf", "_error", "_pos", "max_body", "skipped_frames")

    def __init__(self, *, max_body: int = MAX_FRAME_BODY) -> None:
        self.max_body = max_body
        self.skipped_frames = 0
        self._buf = bytearray()
        self._pos = 0
        self._error: RemoteProtocolError | None = None

    @property
    def error(self) -> RemoteProtocolError | None:
        """The error that broke this decoder, if any; :meth:`split` defers raising it."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as frames."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next whole frame as ``(type, body)``, or None until more data arrives.

        Types are returned as plain ints, including unknown ones: this is the
        raw layer under :meth:`next_event`.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_BYTES:
            return None
        frame_type, length = FRAME_HEADER.unpack_from(buf, pos)
        if length > self.max_body:
            self._error = RemoteProtocolError(
                f"frame of type 0x{frame_type:02x} claims {length} bytes,"
                f" over the limit of {self.max_body}",
                CloseReason.FRAME_TOO_LARGE,
            )
            raise self._error
        end = pos + HEADER_BYTES + length
        if len(buf) < end:
            return None
        self._pos = end
        return frame_type, bytes(buf[pos + HEADER_BYTES : end])

    def split(
        self, max_frames: int | None = None, max_bytes: int | None = None
    ) -> list[tuple[int, bytes]]:
        """The whole frames buffered now, as :meth:`next_frame` would return them one by one.

        At most ``max_frames`` frames, holding at most ``max_bytes`` bytes
        (headers included) unless the first frame alone is larger: the rest
        stays buffered for the next call. A caller that must not do
        unbounded work per call (the relay, between two yields to other
        connections) takes a received message in such slices.

        This is the relay's hot path, so the loop is written out with locals.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        end = len(buf)
        # Past this position a frame may not end, unless it is the first one.
        cap = end if max_bytes is None else pos + max_bytes
        limit = self.max_body
        unpack = FRAME_HEADER.unpack_from
        frames: list[tuple[int, bytes]] = []
        append = frames.append
        left = -1 if max_frames is None else max_frames
        while end - pos >= HEADER_BYTES and left:
            frame_type, length = unpack(buf, pos)
            if length > limit:
                self._pos = pos
                self._error = RemoteProtocolError(
                    f"frame of type 0x{frame_type:02x} claims {length} bytes,"
                    f" over the limit of {limit}",
                    CloseReason.FRAME_TOO_LARGE,
                )
                if frames:
                    # Deliver the good frames before the bad one; the error comes next
                    # call, or from :attr:`error`.
                    return frames
                raise self._error
            stop = pos + HEADER_BYTES + length
            if stop > end or (stop > cap and frames):
                break
            append((frame_type, bytes(buf[pos + HEADER_BYTES : stop])))
            pos = stop
            left -= 1
        self._pos = pos
        return frames

    def relay_split(
        self, src: bytes, max_frames: int | None = None, max_bytes: int | None = None
    ) -> list[tuple[int, int, bytes, bytes]]:
        """What :meth:`split` returns, as a relay routes it: runs of packets.

        Consecutive SendPackets to one destination come as one item
        ``(SEND_PACKET, count, frames, dest)``: ``frames`` holds the ``count``
        RecvPackets from ``src`` that deliver them (headers included, each
        rewritten in place in the buffer before the one copy out) and ``dest``
        is their destination key. Any other frame comes alone as
        ``(type, 1, body, b"")``. The bounds are :meth:`split`'s, in frames
        (``count`` of them for a run). A SendPacket whose body has no
        destination key or holds a packet over :data:`MAX_PACKET_BYTES`
        breaks the decoder like a frame over ``max_body``: the frames before
        it are handed out, the error comes next call or from :attr:`error`.

        This is the relay's hot path, so the loop is written out with locals.
        """
        if self._error is not None:
            raise self._error
        if len(src) != KEY_BYTES:
            raise ValueError(f"src must be {KEY_BYTES} bytes, got {len(src)}")
        buf = self._buf
        pos = self._pos
        end = len(buf)
        cap = end if max_bytes is None else pos + max_bytes
        limit = self.max_body
        unpack = FRAME_HEADER.unpack_from
        # The header and the key in one call: a slice assignment costs more.
        rewrite = _HEADER_AND_KEY.pack_into
        at_key = buf.startswith
        items: list[tuple[int, int, bytes, bytes]] = []
        append = items.append
        left = -1 if max_frames is None else max_frames
        largest = KEY_BYTES + MAX_PACKET_BYTES
        # The run of SendPackets being gathered: where it starts, its key, its length.
        run_start = run_count = 0
        run_key = b""
        error: RemoteProtocolError | None = None
        while end - pos >= HEADER_BYTES and left:
            frame_type, length = unpack(buf, pos)
            if length > limit:
                error = RemoteProtocolError(
                    f"frame of type 0x{frame_type:02x} claims {length} bytes,"
                    f" over the limit of {limit}",
                    CloseReason.FRAME_TOO_LARGE,
                )
                break
            stop = pos + HEADER_BYTES + length
            if stop > end or (stop > cap and (items or run_count)):
                break
            key = pos + HEADER_BYTES
            if frame_type == _SEND_TYPE:
                if length < KEY_BYTES or length > largest:
                    error = bad_send_packet(length)
                    break
                if not (run_count and at_key(run_key, key)):
                    if run_count:
                        append((_SEND_TYPE, run_count, bytes(buf[run_start:pos]), run_key))
                    run_start = pos
                    run_count = 0
                    run_key = bytes(buf[key : key + KEY_BYTES])
                run_count += 1
                rewrite(buf, pos, _RECV_TYPE, length, src)
            else:
                if run_count:
                    append((_SEND_TYPE, run_count, bytes(buf[run_start:pos]), run_key))
                    run_count = 0
                append((frame_type, 1, bytes(buf[key:stop]), b""))
            pos = stop
            left -= 1
        if run_count:
            append((_SEND_TYPE, run_count, bytes(buf[run_start:pos]), run_key))
        self._pos = pos
        if error is not None:
            self._error = error
            if not items:
                raise error
        return items

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA`. Unknown frame types are skipped."""
        while True:
            frame = self.next_frame()
            if frame is None:
                return NEED_DATA
            try:
                event = decode_body(*frame)
            except RemoteProtocolError as exc:
                self._error = exc
                raise
            if event is not None:
                return event
            self.skipped_frames += 1
