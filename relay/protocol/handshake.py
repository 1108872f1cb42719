"""The connection handshake, sans-IO: what each side seals, sends and checks.

1. Relay → client: ServerKey(relay key, fresh 32-byte challenge).
2. Client → relay: ClientInfo(client key, nonce, box(JSON)) sealed from the
   client's private key to the relay's public key. The JSON carries the
   challenge; only the holder of the client's private key can produce a box
   that opens, and a box made for another connection carries the wrong
   challenge, so a recorded handshake cannot be replayed even over plain ws://.
3. Relay → client: ServerInfo(nonce, box(JSON)) sealed to the client.

ClientInfo JSON: ``{"version": 2, "challenge": "<hex>", "token": "...",
"mesh_proof": "<hex>", "preferred": true, "disco_key": "nodekey:<hex>",
"endpoints": ["ip:port", ...]}`` (all but version and challenge optional).
A mesh peer proves the shared mesh key with
``HMAC-SHA256(mesh_key, "relaymesh mesh v1" | challenge | client key)``: the
key itself never crosses the wire.

ServerInfo JSON: ``{"version": 2, "rate_bytes_per_s": int, "rate_burst_bytes": int,
"keepalive_s": float}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.utils

from .keys import NodeKey, PrivateKey
from .wire import (
    CHALLENGE_BYTES,
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
    #: For direct paths: the client's disco key and endpoint candidates ("ip:port").
    disco_key: str | None = None
    endpoints: tuple[str, ...] = ()


def seal_client_info(
    key: PrivateKey,
    server: ServerKey,
    *,
    token: str | None = None,
    mesh_key: bytes | None = None,
    preferred: bool = False,
    disco_key: NodeKey | None = None,
    endpoints: tuple[str, ...] = (),
) -> ClientInfo:
    info: dict[str, Any] = {"version": PROTOCOL_VERSION, "challenge": server.challenge.hex()}
    if disco_key is not None:
        info["disco_key"] = str(disco_key)
    if endpoints:
        info["endpoints"] = list(endpoints)
    if token is not None:
        info["token"] = token
    if mesh_key is not None:
        info["mesh_proof"] = mesh_proof(mesh_key, server.challenge, key.public).hex()
    if preferred:
        info["preferred"] = True
    sealed = key.box(NodeKey(server.public_key)).encrypt(json.dumps(info).encode())
    return ClientInfo(client_key=key.public.raw, nonce=sealed.nonce, sealed=sealed.ciphertext)


def _open_json(
    key: PrivateKey, peer: NodeKey, nonce: bytes, sealed: bytes, what: str
) -> dict[str, Any]:
    try:
        plain = key.box(peer).decrypt(sealed, nonce)
    except (nacl.exceptions.CryptoError, ValueError) as exc:
        raise RemoteProtocolError(f"{what} box did not open", CloseReason.BAD_HANDSHAKE) from exc
    try:
        obj = json.loads(plain)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RemoteProtocolError(f"{what} is not JSON", CloseReason.BAD_HANDSHAKE) from exc
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what} is not a JSON object", CloseReason.BAD_HANDSHAKE)
    return obj


def open_client_info(key: PrivateKey, challenge: bytes, event: ClientInfo) -> ClientHello:
    """Check a ClientInfo against the challenge this connection was sent."""
    client = NodeKey(event.client_key)
    info = _open_json(key, client, event.nonce, event.sealed, "ClientInfo")
    got = info.get("challenge")
    if not isinstance(got, str) or not hmac.compare_digest(got, challenge.hex()):
        raise RemoteProtocolError(
            "ClientInfo answers another challenge (replayed handshake?)", CloseReason.BAD_CHALLENGE
        )
    version = info.get("version")
    if not isinstance(version, int) or version < PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"protocol version {version!r} is not supported", CloseReason.BAD_HANDSHAKE
        )
    token = info.get("token")
    proof = info.get("mesh_proof")
    try:
        proof_bytes = bytes.fromhex(proof) if isinstance(proof, str) else None
    except ValueError:
        raise RemoteProtocolError("mesh_proof is not hex", CloseReason.BAD_HANDSHAKE) from None
    disco = info.get("disco_key")
    try:
        disco_key = str(NodeKey.parse(disco)) if isinstance(disco, str) else None
    except ValueError:
        raise RemoteProtocolError("disco_key is not a key", CloseReason.BAD_HANDSHAKE) from None
    raw_eps = info.get("endpoints", [])
    if (
        not isinstance(raw_eps, list)
        or len(raw_eps) > 32
        or not all(isinstance(e, str) and len(e) < 64 and ":" in e for e in raw_eps)
    ):
        raise RemoteProtocolError("endpoints must be a list of ip:port", CloseReason.BAD_HANDSHAKE)
    return ClientHello(
        client_key=client,
        version=version,
        token=token if isinstance(token, str) else None,
        mesh_proof=proof_bytes,
        preferred=info.get("preferred") is True,
        disco_key=disco_key,
        endpoints=tuple(raw_eps),
    )


def seal_server_info(key: PrivateKey, client: NodeKey, info: dict[str, Any]) -> ServerInfo:
    sealed = key.box(client).encrypt(json.dumps({"version": PROTOCOL_VERSION, **info}).encode())
    return ServerInfo(nonce=sealed.nonce, sealed=sealed.ciphertext)


def open_server_info(key: PrivateKey, server: NodeKey, event: ServerInfo) -> dict[str, Any]:
    return _open_json(key, server, event.nonce, event.sealed, "ServerInfo")
