"""The connection handshake, sans-IO: what each side seals, sends and checks.

1. Relay → client: ServerKey(relay key, fresh 32-byte challenge).
2. Client → relay: ClientInfo(client key, nonce, box(JSON)) sealed from the
   client's private key to the relay's public key. The JSON carries the
   challenge; only the holder of the client's private key can produce a box
   that opens, and a box made for another connection carries the wrong
   challenge, so a recorded handshake cannot be replayed even over plain ws://.
3. Relay → client: ServerInfo(nonce, box(JSON)) sealed to the client.

ClientInfo JSON: ``{"version": 2, "challenge": "<hex>", "token": "...",
"mesh_proof": "<hex>", "probe": true, "preferred": true, "disco_key":
"nodekey:<hex>", "endpoints": ["ip:port", ...]}`` (all but version and
challenge optional; hex is lower-case; ``probe`` only with ``mesh_proof``).
Its size, depth and every field's type and form are checked before use:
hostile input raises :class:`RemoteProtocolError`, never anything else.
A mesh peer proves the shared mesh key with
``HMAC-SHA256(mesh_key, "relaymesh mesh v1" | challenge | client key)``: the
key itself never crosses the wire. With ``"probe": true`` the same proof marks
one of the mesh's own probe clients instead: an ordinary client for routing,
left out of client counts (a lone relay proves with a secret of its own).

ServerInfo JSON: ``{"version": 2, "rate_bytes_per_s": int, "rate_burst_bytes": int,
"keepalive_s": float}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, Final

import nacl.exceptions
import nacl.utils

from .keys import NodeKey, PrivateKey
from .wire import (
    CHALLENGE_BYTES,
    KEY_BYTES,
    MAX_HANDSHAKE_BODY,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    ClientInfo,
    CloseReason,
    RemoteProtocolError,
    ServerInfo,
    ServerKey,
)

__all__ = [
    "ClientHello",
    "mesh_proof",
    "new_challenge",
    "open_client_info",
    "open_server_info",
    "seal_client_info",
    "seal_server_info",
]

_MESH_CONTEXT = b"relaymesh mesh v1"

#: Limits on a ClientInfo's JSON, all checked before the value is used (docs/PROTOCOL.md).
#: The frame limit leaves at most 4,096 - 32 - 24 - 16 = 4,024 bytes of JSON.
MAX_JSON_BYTES: Final = MAX_HANDSHAKE_BODY - KEY_BYTES - NONCE_BYTES - 16
MAX_JSON_DEPTH: Final = 4
MAX_VERSION: Final = 65535
MAX_TOKEN_CHARS: Final = 256
MAX_ENDPOINTS: Final = 32
MAX_ENDPOINT_CHARS: Final = 63

# ASCII only: str.isdigit-style classes would let other scripts' digits through.
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_NODEKEY = re.compile(r"nodekey:[0-9a-f]{64}", re.ASCII)
# A string (an unterminated one runs to the end, so no input makes the scan quadratic)
# or a bracket.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


def new_challenge() -> bytes:
    return nacl.utils.random(CHALLENGE_BYTES)


def mesh_proof(mesh_key: bytes, challenge: bytes, client_key: NodeKey) -> bytes:
    return hmac.new(mesh_key, _MESH_CONTEXT + challenge + client_key.raw, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientHello:
    """What a relay learned from a ClientInfo that opened and matched its challenge."""

    client_key: NodeKey
    version: int
    token: str | None
    mesh_proof: bytes | None
    preferred: bool
    #: A probe client of the mesh's health monitor (proved by ``mesh_proof``), not a relay.
    probe: bool = False
    #: For direct paths: the client's disco key and endpoint candidates ("ip:port").
    disco_key: str | None = None
    endpoints: tuple[str, ...] = ()


def seal_client_info(
    key: PrivateKey,
    server: ServerKey,
    *,
    token: str | None = None,
    mesh_key: bytes | None = None,
    probe: bool = False,
    preferred: bool = False,
    disco_key: NodeKey | None = None,
    endpoints: tuple[str, ...] = (),
) -> ClientInfo:
    """``probe``: a health probe client, proved by ``mesh_key`` (required with it)."""
    if probe and mesh_key is None:
        raise ValueError("a probe client proves itself with the mesh key")
    info: dict[str, Any] = {"version": PROTOCOL_VERSION, "challenge": server.challenge.hex()}
    if disco_key is not None:
        info["disco_key"] = str(disco_key)
    if endpoints:
        info["endpoints"] = list(endpoints)
    if token is not None:
        info["token"] = token
    if mesh_key is not None:
        info["mesh_proof"] = mesh_proof(mesh_key, server.challenge, key.public).hex()
    if probe:
        info["probe"] = True
    if preferred:
        info["preferred"] = True
    sealed = key.box(NodeKey(server.public_key)).encrypt(json.dumps(info).encode())
    return ClientInfo(client_key=key.public.raw, nonce=sealed.nonce, sealed=sealed.ciphertext)


def _json_depth(text: str) -> int:
    """How deeply ``text``'s arrays and objects nest, counted without parsing it.

    Brackets inside strings do not count. For valid JSON this is exact; for
    invalid JSON it is at least the depth a parser would reach before it fails,
    which is all the bound needs. Linear in the length of ``text``.
    """
    depth = deepest = 0
    for token in _TOKENS.findall(text):
        if token in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in ("]", "}"):
            depth -= 1
    return deepest


def _open_json(
    key: PrivateKey, peer: NodeKey, nonce: bytes, sealed: bytes, what: str
) -> dict[str, Any]:
    # The frame limit (MAX_HANDSHAKE_BODY) already bounds the size; the depth is
    # checked before parsing, since Python's parser recurses once per level.
    try:
        plain = key.box(peer).decrypt(sealed, nonce)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise RemoteProtocolError(f"{what} box did not open", CloseReason.BAD_HANDSHAKE) from exc
    if len(plain) > MAX_JSON_BYTES:
        raise RemoteProtocolError(
            f"{what} JSON of {len(plain)} bytes is over the limit of {MAX_JSON_BYTES}",
            CloseReason.BAD_HANDSHAKE,
        )
    try:
        text = plain.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} is not UTF-8", CloseReason.BAD_HANDSHAKE) from None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise RemoteProtocolError(
            f"{what} JSON nests deeper than {MAX_JSON_DEPTH} levels", CloseReason.BAD_HANDSHAKE
        )
    try:
        obj = json.loads(text)
    except ValueError:  # JSONDecodeError, and an integer of too many digits
        raise RemoteProtocolError(f"{what} is not JSON", CloseReason.BAD_HANDSHAKE) from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what} is not a JSON object", CloseReason.BAD_HANDSHAKE)
    return obj


def _bad(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg, CloseReason.BAD_HANDSHAKE)


def open_client_info(key: PrivateKey, challenge: bytes, event: ClientInfo) -> ClientHello:
    """Check a ClientInfo against the challenge this connection was sent.

    Every field's type and form is checked before it is used; anything else
    raises :class:`RemoteProtocolError` (4005, or 4006 for a challenge that is
    well formed but not this connection's).
    """
    client = NodeKey(event.client_key)
    info = _open_json(key, client, event.nonce, event.sealed, "ClientInfo")
    got = info.get("challenge")
    if not isinstance(got, str) or not _HEX64.fullmatch(got):
        raise _bad("challenge must be 64 lower-case hex digits")
    if not hmac.compare_digest(bytes.fromhex(got), challenge):
        raise RemoteProtocolError(
            "ClientInfo answers another challenge (replayed handshake?)", CloseReason.BAD_CHALLENGE
        )
    version = info.get("version")
    if (
        not isinstance(version, int)
        or isinstance(version, bool)
        or not PROTOCOL_VERSION <= version <= MAX_VERSION
    ):
        raise _bad(f"protocol version {str(version)[:20]!r} is not supported")
    token = info.get("token")
    if token is not None and (not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS):
        raise _bad(f"token must be a string of at most {MAX_TOKEN_CHARS} characters")
    proof = info.get("mesh_proof")
    if proof is not None and (not isinstance(proof, str) or not _HEX64.fullmatch(proof)):
        raise _bad("mesh_proof must be 64 lower-case hex digits")
    probe = info.get("probe", False)
    if not isinstance(probe, bool):
        raise _bad("probe must be true or false")
    if probe and proof is None:
        raise _bad("probe needs mesh_proof")
    preferred = info.get("preferred", False)
    if not isinstance(preferred, bool):
        raise _bad("preferred must be true or false")
    disco = info.get("disco_key")
    if disco is not None and (not isinstance(disco, str) or not _NODEKEY.fullmatch(disco)):
        raise _bad("disco_key must be nodekey: and 64 lower-case hex digits")
    raw_eps = info.get("endpoints", [])
    if (
        not isinstance(raw_eps, list)
        or len(raw_eps) > MAX_ENDPOINTS
        or not all(
            isinstance(e, str) and len(e) <= MAX_ENDPOINT_CHARS and ":" in e for e in raw_eps
        )
    ):
        raise _bad(
            f"endpoints must be a list of at most {MAX_ENDPOINTS} ip:port strings"
            f" of at most {MAX_ENDPOINT_CHARS} characters"
        )
    return ClientHello(
        client_key=client,
        version=version,
        token=token,
        mesh_proof=bytes.fromhex(proof) if proof is not None else None,
        preferred=preferred,
        probe=probe,
        disco_key=disco,
        endpoints=tuple(raw_eps),
    )


def seal_server_info(key: PrivateKey, client: NodeKey, info: dict[str, Any]) -> ServerInfo:
    sealed = key.box(client).encrypt(json.dumps({"version": PROTOCOL_VERSION, **info}).encode())
    return ServerInfo(nonce=sealed.nonce, sealed=sealed.ciphertext)


def open_server_info(key: PrivateKey, server: NodeKey, event: ServerInfo) -> dict[str, Any]:
    return _open_json(key, server, event.nonce, event.sealed, "ServerInfo")
