"""The map a relay serves at /regionmap: the configured map joined with the registry.

- With a configured map (``[region_map] file``), every configured node is
  listed; ``up`` says whether the registry has it now, and ``public_key``
  comes from its registry record (only a registered node has a key to pin).
  A node whose relay registered a public address (its ``[public]`` config)
  is listed at that address while it is up: the relay knows where it is
  published (docker-compose.yml sets one host for all with
  ``RELAYMESH_PUBLIC_HOST``); the file's address stands for the others.
- ``tls`` (the wss:// and https:// schemes) is the configured value, or true
  when the node's registry record has a ``wss://`` URL.
- Without one, the map is built from the registry alone: one region per
  region code seen (ids in code order, so they are stable), one node per
  relay, at its public address, else its mesh address. This is what
  ``relaymesh up`` serves.

The body is canonical JSON (sorted keys, no spaces), so its ETag is a hash of
the content, and an operator's Ed25519 key can sign exactly those bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import nacl.exceptions
import nacl.signing

from coordinator.registry import RelayRecord

from .model import Region, RegionMap, RelayNode

__all__ = ["SIGNATURE_HEADER", "etag", "live_map", "sign", "verify"]

SIGNATURE_HEADER = "X-Relaymesh-Signature"


def _public(rec: RelayRecord) -> tuple[str, str, str | None]:
    """The address clients use: the registered public one, else the mesh address."""
    if rec.public_ws_url:
        return rec.public_ws_url, rec.public_http_url or rec.public_ws_url, rec.public_stun
    return rec.ws_url, rec.http_url, rec.stun


def _node_from_record(rec: RelayRecord) -> RelayNode:
    node = RelayNode(
        name=rec.name, host="127.0.0.1", ws_port=80, http_port=80, public_key=rec.public_key
    )
    return node.with_public_host(*_public(rec))


def live_map(configured: RegionMap | None, relays: Iterable[RelayRecord]) -> RegionMap:
    by_name = {rec.name: rec for rec in relays}
    if configured is not None:
        regions = []
        for region in configured.regions:
            nodes = []
            for node in region.nodes:
                rec = by_name.get(node.name)
                if rec is not None and rec.public_ws_url:
                    node = node.with_public_host(*_public(rec))
                nodes.append(
                    node.model_copy(
                        update={
                            "up": rec is not None,
                            "public_key": rec.public_key if rec is not None else None,
                            # A relay that serves TLS says so in its record: never hand
                            # clients a ws:// URL for a port that only speaks TLS.
                            "tls": node.tls
                            or (rec is not None and rec.ws_url.startswith("wss://")),
                        }
                    )
                )
            regions.append(region.model_copy(update={"nodes": nodes}))
        return configured.model_copy(update={"regions": regions})
    codes = sorted({rec.region for rec in by_name.values()})
    return RegionMap(
        regions=[
            Region(
                id=i,
                code=code,
                name=code,
                nodes=[
                    _node_from_record(rec)
                    for rec in sorted(by_name.values(), key=lambda r: r.name)
                    if rec.region == code
                ],
            )
            for i, code in enumerate(codes, start=1)
        ]
    )


def etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def sign(body: bytes, key: nacl.signing.SigningKey) -> str:
    return "ed25519:" + key.sign(body).signature.hex()


def verify(body: bytes, signature: str | None, key: nacl.signing.VerifyKey) -> bool:
    if not signature or not signature.startswith("ed25519:"):
        return False
    try:
        key.verify(body, bytes.fromhex(signature[len("ed25519:") :]))
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True
