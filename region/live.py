"""The map a relay serves at /regionmap: the configured map joined with the registry.

- With a configured map (``[region_map] file``), every configured node is
  listed; ``up`` says whether the registry has it now, and ``public_key``
  comes from its registry record (only a registered node has a key to pin).
- ``tls`` (the wss:// and https:// schemes) is the configured value, or true
  when the node's registry record has a ``wss://`` URL.
- Without one, the map is built from the registry alone: one region per
  region code seen (ids in code order, so they are stable), one node per
  relay. This is what ``relaymesh up`` serves.

The body is canonical JSON (sorted keys, no spaces), so its ETag is a hash of
the content, and an operator's Ed25519 key can sign exactly those bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from urllib.parse import urlsplit

import nacl.exceptions
import nacl.signing

from coordinator.registry import RelayRecord

from .model import Region, RegionMap, RelayNode

__all__ = ["SIGNATURE_HEADER", "etag", "live_map", "sign", "verify"]

SIGNATURE_HEADER = "X-Relaymesh-Signature"


def _node_from_record(rec: RelayRecord) -> RelayNode:
    ws = urlsplit(rec.ws_url)
    http = urlsplit(rec.http_url) if rec.http_url else ws
    stun_port = int(rec.stun.rsplit(":", 1)[1]) if rec.stun else 0
    return RelayNode(
        name=rec.name,
        host=ws.hostname or "127.0.0.1",
        ws_port=ws.port or (443 if ws.scheme == "wss" else 80),
        http_port=http.port or (443 if http.scheme == "https" else 80),
        stun_port=stun_port,
        public_key=rec.public_key,
        up=True,
        tls=ws.scheme == "wss",
    )


def live_map(configured: RegionMap | None, relays: Iterable[RelayRecord]) -> RegionMap:
    by_name = {rec.name: rec for rec in relays}
    if configured is not None:
        regions = []
        for region in configured.regions:
            nodes = []
            for node in region.nodes:
                rec = by_name.get(node.name)
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
