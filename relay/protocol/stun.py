"""STUN binding (RFC 5389, and RFC 3489 clients): sans-IO codec and ``serve_stun``.

Every relay answers STUN binding requests on its STUN port with the address
and port the request came from, so a client learns its public (reflexive)
address, and, by asking several relays, whether its NAT maps each destination
to a different port ("hard" NAT).

Message layout (all big-endian)::

    0                   1                   2                   3
    |0 0|  message type (14) |        message length          |
    |                  magic cookie 0x2112A442                  |
    |                 transaction id (96 bits)                  |
    |  attributes: type (16) | length (16) | value, padded to 4 |

A request without the magic cookie is an RFC 3489 request: its 128-bit
transaction id starts where the cookie would be, and it is answered with
MAPPED-ADDRESS. RFC 5389 requests get XOR-MAPPED-ADDRESS (and MAPPED-ADDRESS,
which old parsers read) and a FINGERPRINT.

Malformed packets are ignored (no answer; the caller counts them). A request
carrying an unknown comprehension-required attribute gets a 420 error
response listing it, as RFC 5389 §7.3.1 asks.
"""

from __future__ import annotations

import binascii
import enum
import ipaddress
import os
import struct
from dataclasses import dataclass

__all__ = [
    "MAGIC_COOKIE",
    "BindingRequest",
    "StunError",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "handle_datagram",
    "new_transaction_id",
]

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack(">I", MAGIC_COOKIE)
_HDR = struct.Struct(">HHI12s")
_ATTR = struct.Struct(">HH")
_FINGERPRINT_XOR = 0x5354554E
SOFTWARE = b"relaymesh"


class MsgType(enum.IntEnum):
    BINDING_REQUEST = 0x0001
    BINDING_SUCCESS = 0x0101
    BINDING_ERROR = 0x0111


class Attr(enum.IntEnum):
    MAPPED_ADDRESS = 0x0001
    CHANGE_REQUEST = 0x0003
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    XOR_MAPPED_ADDRESS = 0x0020
    SOFTWARE = 0x8022
    FINGERPRINT = 0x8028


class StunError(Exception):
    """A datagram that is not a well-formed STUN message we can use."""


@dataclass(frozen=True, slots=True)
class BindingRequest:
    #: 12 bytes (RFC 5389) or 16 bytes (RFC 3489: cookie position included).
    transaction_id: bytes
    classic: bool
    unknown_required: tuple[int, ...] = ()


def new_transaction_id() -> bytes:
    return os.urandom(12)


def _fingerprint(msg: bytes) -> bytes:
    return struct.pack(">I", (binascii.crc32(msg) & 0xFFFFFFFF) ^ _FINGERPRINT_XOR)


def _attrs(body: bytes) -> list[tuple[int, bytes, int]]:
    """(type, value, offset of the attribute header in body)."""
    out = []
    pos = 0
    while pos < len(body):
        if len(body) - pos < 4:
            raise StunError("truncated attribute header")
        atype, alen = _ATTR.unpack_from(body, pos)
        end = pos + 4 + alen
        if end > len(body):
            raise StunError("attribute runs past the message")
        out.append((atype, body[pos + 4 : end], pos))
        pos = end + (-alen % 4)
    if pos != len(body):
        raise StunError("attribute padding runs past the message")
    return out


def _header(data: bytes) -> tuple[int, int, bytes, bool]:
    if len(data) < 20:
        raise StunError("shorter than a STUN header")
    mtype, length, cookie, tid = _HDR.unpack_from(data)
    if mtype & 0xC000:
        raise StunError("not STUN: the first two bits must be zero")
    if length % 4 or length != len(data) - 20:
        raise StunError("message length does not match the datagram")
    classic = cookie != MAGIC_COOKIE
    return mtype, length, (data[4:20] if classic else tid), classic


def decode_request(data: bytes) -> BindingRequest:
    mtype, _, tid, classic = _header(data)
    if mtype != MsgType.BINDING_REQUEST:
        raise StunError(f"not a binding request (type 0x{mtype:04x})")
    body = data[20:]
    unknown = []
    for atype, value, offset in _attrs(body):
        if atype == Attr.FINGERPRINT:
            if classic or len(value) != 4 or value != _fingerprint(data[: 20 + offset]):
                raise StunError("bad FINGERPRINT")
        elif atype == Attr.CHANGE_REQUEST:
            # RFC 3489/5780 NAT-type tests ask us to answer from another address or
            # port. We have one of each; staying silent is the answer they expect.
            if len(value) == 4 and value[3] & 0x06:
                raise StunError("asks for a changed address or port, which we do not have")
        elif atype < 0x8000 and atype not in (Attr.MAPPED_ADDRESS, Attr.XOR_MAPPED_ADDRESS):
            unknown.append(atype)
    return BindingRequest(tid, classic, tuple(unknown))


def _address_value(ip: str, port: int, *, xor: bool, tid: bytes) -> bytes:
    addr = ipaddress.ip_address(ip)
    family = 1 if addr.version == 4 else 2
    raw = addr.packed
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE_BYTES + tid
        raw = bytes(b ^ m for b, m in zip(raw, mask, strict=False))
    return struct.pack(">BBH", 0, family, port) + raw


def _attr(atype: int, value: bytes) -> bytes:
    return _ATTR.pack(atype, len(value)) + value + bytes(-len(value) % 4)


def _message(mtype: int, req: BindingRequest, attrs: list[bytes], *, fingerprint: bool) -> bytes:
    body = b"".join(attrs)
    head = struct.pack(">HH", mtype, len(body) + (8 if fingerprint else 0)) + (
        req.transaction_id if req.classic else _COOKIE_BYTES + req.transaction_id
    )
    msg = head + body
    if fingerprint:
        msg += _attr(Attr.FINGERPRINT, _fingerprint(msg))
    return msg


def encode_response(req: BindingRequest, ip: str, port: int) -> bytes:
    """The answer to ``req`` from ``ip:port`` (the address the request came from)."""
    if req.unknown_required:
        value = struct.pack(">BBBB", 0, 0, 4, 20) + b"Unknown Attribute"
        unknown = b"".join(struct.pack(">H", a) for a in req.unknown_required)
        return _message(
            MsgType.BINDING_ERROR,
            req,
            [_attr(Attr.ERROR_CODE, value), _attr(Attr.UNKNOWN_ATTRIBUTES, unknown)],
            fingerprint=not req.classic,
        )
    if req.classic:
        return _message(
            MsgType.BINDING_SUCCESS,
            req,
            [_attr(Attr.MAPPED_ADDRESS, _address_value(ip, port, xor=False, tid=b""))],
            fingerprint=False,
        )
    return _message(
        MsgType.BINDING_SUCCESS,
        req,
        [
            _attr(
                Attr.XOR_MAPPED_ADDRESS, _address_value(ip, port, xor=True, tid=req.transaction_id)
            ),
            _attr(Attr.MAPPED_ADDRESS, _address_value(ip, port, xor=False, tid=b"")),
            _attr(Attr.SOFTWARE, SOFTWARE),
        ],
        fingerprint=True,
    )


def handle_datagram(data: bytes, ip: str, port: int) -> bytes:
    """The reply to one datagram from ``ip:port``. Raises StunError to ignore it."""
    return encode_response(decode_request(data), ip, port)


# ---- the client side ---------------------------------------------------------


def encode_request(transaction_id: bytes) -> bytes:
    """An RFC 5389 binding request with a FINGERPRINT."""
    if len(transaction_id) != 12:
        raise ValueError("an RFC 5389 transaction id is 12 bytes")
    return _message(
        MsgType.BINDING_REQUEST, BindingRequest(transaction_id, False), [], fingerprint=True
    )


def _parse_address(value: bytes, *, xor: bool, tid: bytes) -> tuple[str, int]:
    if len(value) < 4:
        raise StunError("short address attribute")
    _, family, port = struct.unpack_from(">BBH", value)
    size = {1: 4, 2: 16}.get(family)
    if size is None or len(value) != 4 + size:
        raise StunError("bad address family or length")
    raw = value[4:]
    if xor:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(b ^ m for b, m in zip(raw, _COOKIE_BYTES + tid, strict=False))
    return str(ipaddress.ip_address(raw)), port


def decode_response(data: bytes) -> tuple[bytes, str, int]:
    """(transaction id, reflexive ip, reflexive port) from a binding success response."""
    mtype, _, tid, classic = _header(data)
    if mtype != MsgType.BINDING_SUCCESS:
        raise StunError(f"not a binding success response (type 0x{mtype:04x})")
    mapped = xored = None
    for atype, value, offset in _attrs(data[20:]):
        if atype == Attr.XOR_MAPPED_ADDRESS and not classic:
            xored = _parse_address(value, xor=True, tid=tid)
        elif atype == Attr.MAPPED_ADDRESS:
            mapped = _parse_address(value, xor=False, tid=tid)
        elif atype == Attr.FINGERPRINT and value != _fingerprint(data[: 20 + offset]):
            raise StunError("bad FINGERPRINT")
    found = xored or mapped
    if found is None:
        raise StunError("response carries no address")
    return tid, found[0], found[1]
