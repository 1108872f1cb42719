"""RFC 6455 frames over an open WebSocket, sans-IO: the relay's data path.

Theory of operation
-------------------
The HTTP upgrade that opens a WebSocket is wsproto's (``H11Handshake``); what
follows it, frames, is this module's. The relay protocol is a stream of frames
carried in binary WebSocket messages whose boundaries mean nothing
(docs/PROTOCOL.md, "Transport"), so :class:`FrameReader` does not assemble
messages: it hands out the payload of binary frames as it arrives, unmasked,
a piece of a frame as soon as the piece is there, and keeps back only an
incomplete frame header or an incomplete control frame (at most 139 bytes).
What a general WebSocket library does per message (collect the parts, join
them, queue the message for another task) the relay does not need, and at
relay rates it cost more than routing the packets inside (docs/performance.md).

What it checks, per RFC 6455 §5: the mask bit (every frame from a client is
masked, none from a server), no RSV bit (no extension is ever negotiated),
known opcodes, minimal length encodings, control frames unfragmented and at
most 125 bytes, continuation frames only inside a message and a new message
only after the last one ended, close payloads (a valid code, UTF-8 text). A
violation raises :class:`WebSocketError` with the close code to send (1002,
1007). A message over ``max_message`` bytes raises it with 1009 as soon as
the header of the frame that crosses the limit arrives, and a text message
with the relay protocol's own code (4010) at its first frame: text is not
part of the protocol, so it is never buffered or validated.

Control frames come out as :class:`Ping`, :class:`Pong` and :class:`Close`
events, in order with the data around them; after a Close nothing more is
read. :func:`encode_frame` and :func:`close_payload` build what an endpoint
sends: unmasked from a server, masked with a fresh key from a client.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Final

from websockets.speedups import apply_mask

from .wire import CloseReason, RemoteProtocolError

__all__ = [
    "BINARY",
    "CLOSE",
    "PING",
    "PONG",
    "TEXT",
    "Close",
    "FrameReader",
    "Ping",
    "Pong",
    "WebSocketError",
    "close_payload",
    "encode_frame",
    "frame_header",
]

CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA

#: Close codes: "no status received" (never sent on the wire) and "abnormal closure"
#: (the TCP connection ended without a Close frame).
NO_STATUS: Final = 1005
ABNORMAL: Final = 1006
#: The largest control frame payload (RFC 6455 §5.5).
MAX_CONTROL_PAYLOAD: Final = 125

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
#: Codes an endpoint may send in a Close frame (RFC 6455 §7.4; 3000-4999 are registered
#: or private). 1004-1006 and 1015 are reserved, 1012-1014 are registered since.
_SENDABLE_BELOW_3000: Final = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)
_NO_EVENTS: Final[tuple[()]] = ()


class WebSocketError(RemoteProtocolError):
    """The peer broke RFC 6455 (or sent what this endpoint refuses); ``reason`` is the
    close code to answer with."""


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's Close frame: ``code`` is 1005 when it carried none."""

    code: int
    reason: str


Event = Ping | Pong | Close


def _close_from(payload: bytes) -> Close:
    if not payload:
        return Close(NO_STATUS, "")
    if len(payload) == 1:
        raise WebSocketError("a Close frame with a one-byte payload", CloseReason.PROTOCOL_ERROR)
    (code,) = _U16.unpack_from(payload)
    if not (code in _SENDABLE_BELOW_3000 or 3000 <= code <= 4999):
        raise WebSocketError(f"close code {code} may not be sent", CloseReason.PROTOCOL_ERROR)
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise WebSocketError(
            "a close reason that is not UTF-8", CloseReason.INVALID_PAYLOAD
        ) from None
    return Close(code, reason)


class FrameReader:
    """Reads the frames one peer sends: binary payload out as a stream, control frames
    as events. ``from_client`` says which side the frames come from (they must be
    masked exactly when they do)."""

    __slots__ = (
        "_buf",
        "_closed",
        "_in_message",
        "_key",
        "_left",
        "_masked",
        "_message_bytes",
        "max_message",
        "noop_frames",
    )

    def __init__(self, *, from_client: bool, max_message: int) -> None:
        self._masked = from_client
        #: Bytes a message may hold; may be raised (or lowered) at any time.
        self.max_message = max_message
        # An incomplete frame header or control frame, kept until the rest arrives.
        self._buf: bytes | bytearray = b""
        # Payload bytes of the current data frame not read yet, and its mask key, turned
        # so that it starts at the next byte.
        self._left = 0
        self._key = b""
        self._in_message = False
        self._message_bytes = 0
        self._closed = False
        #: Frames read that carried nothing: control frames and empty data frames. They
        #: cost work all the same, so the relay counts them against a client's allowance
        #: of frames that deliver nothing.
        self.noop_frames = 0

    @property
    def closed(self) -> bool:
        """Whether a Close frame was read (nothing after it is)."""
        return self._closed

    def receive(self, data: bytes | bytearray) -> tuple[bytes, tuple[Event, ...] | list[Event]]:
        """The binary payload in ``data`` (unmasked; b"" if none) and the control
        frames it completed, in order. A control frame between two pieces of payload
        is reported after both: the relay protocol's byte stream does not care where
        a Ping fell, and a Close ends the reading (what follows it is dropped).

        Raises :class:`WebSocketError` at the first violation; the reader is not to
        be used after that.
        """
        if self._closed:
            return b"", _NO_EVENTS
        if self._buf:
            data = self._buf + data
            self._buf = b""
        view = memoryview(data)
        end = len(data)
        pos = 0
        pieces: list[bytes] = []
        events: tuple[Event, ...] | list[Event] = _NO_EVENTS
        while pos < end:
            left = self._left
            if left:
                # Inside a data frame's payload: take what is there of it.
                stop = pos + left if end - pos > left else end
                n = stop - pos
                if self._masked:
                    key = self._key
                    pieces.append(apply_mask(view[pos:stop], key))
                    turn = n & 3
                    if turn:
                        self._key = key[turn:] + key[:turn]
                else:
                    pieces.append(bytes(view[pos:stop]))
                self._left = left - n
                pos = stop
                continue
            # A frame header: 2 bytes, then 0, 2 or 8 of length, then 0 or 4 of mask key.
            if end - pos < 2:
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                head = 4
            elif length == 127:
                head = 10
            masked = b1 & 0x80
            if masked:
                head += 4
            if end - pos < head:
                break
            if length == 126:
                (length,) = _U16.unpack_from(data, pos + 2)
                if length < 126:
                    raise WebSocketError(
                        "a frame length in more bytes than needed", CloseReason.PROTOCOL_ERROR
                    )
            elif length == 127:
                (length,) = _U64.unpack_from(data, pos + 2)
                if length >> 63 or length <= 0xFFFF:
                    raise WebSocketError(
                        "a frame length in more bytes than needed, or over 2**63",
                        CloseReason.PROTOCOL_ERROR,
                    )
            if bool(masked) != self._masked:
                raise WebSocketError(
                    "an unmasked frame from a client" if self._masked else "a masked frame",
                    CloseReason.PROTOCOL_ERROR,
                )
            if b0 & 0x70:
                raise WebSocketError(
                    "a frame with an RSV bit set, and no extension was agreed",
                    CloseReason.PROTOCOL_ERROR,
                )
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode & 0x8:
                # A control frame: whole, at most 125 bytes, and handled once it is all here.
                if not fin or length > MAX_CONTROL_PAYLOAD:
                    raise WebSocketError(
                        "a fragmented control frame, or one over 125 bytes",
                        CloseReason.PROTOCOL_ERROR,
                    )
                stop = pos + head + length
                if stop > end:
                    break
                self.noop_frames += 1
                payload = bytes(view[pos + head : stop])
                if masked:
                    payload = apply_mask(payload, bytes(view[pos + head - 4 : pos + head]))
                pos = stop
                event = self._control(opcode, payload)
                if not events:
                    events = []
                assert isinstance(events, list)
                events.append(event)
                if self._closed:
                    break
                continue
            if opcode in (BINARY, TEXT):
                if self._in_message:
                    raise WebSocketError(
                        "a new message before the last one ended", CloseReason.PROTOCOL_ERROR
                    )
                if opcode == TEXT:
                    raise WebSocketError(
                        "text messages are not part of the protocol", CloseReason.TEXT_MESSAGE
                    )
                self._message_bytes = 0
            elif opcode != CONTINUATION:
                raise WebSocketError(f"unknown opcode 0x{opcode:x}", CloseReason.PROTOCOL_ERROR)
            elif not self._in_message:
                raise WebSocketError(
                    "a continuation frame outside a message", CloseReason.PROTOCOL_ERROR
                )
            size = self._message_bytes + length
            if size > self.max_message:
                raise WebSocketError(
                    f"a message of over {self.max_message} bytes", CloseReason.MESSAGE_TOO_BIG
                )
            self._message_bytes = size
            self._in_message = not fin
            if not length:
                self.noop_frames += 1
            if masked:
                self._key = bytes(view[pos + head - 4 : pos + head])
            self._left = length
            pos += head
        if pos < end and not self._closed:
            self._buf = data[pos:]
        if not pieces:
            return b"", events
        if len(pieces) == 1:
            return pieces[0], events
        return b"".join(pieces), events

    def _control(self, opcode: int, payload: bytes) -> Event:
        if opcode == PING:
            return Ping(payload)
        if opcode == PONG:
            return Pong(payload)
        if opcode == CLOSE:
            close = _close_from(payload)
            self._closed = True
            return close
        raise WebSocketError(f"unknown control opcode 0x{opcode:x}", CloseReason.PROTOCOL_ERROR)


def frame_header(length: int, opcode: int = BINARY) -> bytes:
    """The header of one whole (FIN), unmasked frame of ``length`` payload bytes: what a
    server sends before the payload."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length <= 0xFFFF:
        return bytes((0x80 | opcode, 126)) + _U16.pack(length)
    return bytes((0x80 | opcode, 127)) + _U64.pack(length)


def encode_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One whole frame; ``mask`` (a client's frames) masks it with a fresh random key."""
    header = frame_header(len(payload), opcode)
    if not mask:
        return header + payload
    key = os.urandom(4)
    masked_header = bytes((header[0], header[1] | 0x80)) + header[2:] + key
    return masked_header + apply_mask(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    """A Close frame's payload: the code, then the reason cut to fit 125 bytes in all
    (at a character boundary)."""
    if code == NO_STATUS:
        return b""
    text = reason.encode()[: MAX_CONTROL_PAYLOAD - 2].decode(errors="ignore")
    return _U16.pack(code) + text.encode()
