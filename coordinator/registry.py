"""The relay registry: who is up, where, with which key.

Each relay writes ``relays/<relay-id>`` under its own lease (TTL ~8 s, kept
alive every ~2 s); when a relay dies its record, and every peer record it
wrote under the same lease, disappears in one revision. Everyone else learns
of it from their watch (coordinator/state.py). A relay that stops as planned
first rewrites its record with ``leaving_at``, then revokes its lease: whoever
saw that record go knows it left on purpose (coordinator/state.py keeps such
departures).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

__all__ = ["RelayRecord", "relay_key"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayRecord:
    relay_id: str
    region: str
    name: str
    ws_url: str
    http_url: str
    public_key: str
    started_at: float
    version: str
    stun: str | None = None
    #: Where clients reach the relay, when that is not where relays do (its ``[public]``
    #: config: a public host, published ports). None: clients use ws_url, http_url, stun.
    public_ws_url: str | None = None
    public_http_url: str | None = None
    public_stun: str | None = None
    #: Set (Unix time) when the relay announced a planned stop: it is draining and will
    #: deregister. A record deleted after this was a departure, not a failure.
    leaving_at: float | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RelayRecord:
        obj = json.loads(data)
        fields = set(cls.__dataclass_fields__)
        # A newer relay may add fields: ignore what we do not know.
        return cls(**{k: v for k, v in obj.items() if k in fields})


def relay_key(prefix: str, relay_id: str) -> str:
    return f"{prefix}relays/{relay_id}"
