"""The peer map: which relay holds which client.

``peers/<nodekey>`` → ``{relay_id, region, disco_key, endpoints, since}``,
written by the relay the client is connected to, under that relay's lease.

- A clean disconnect deletes the record (the peer is GONE), but only if it
  still names this relay: a client that moved is owned by the newest
  registration, and the old relay must not delete the new one's record.
- A relay whose lease expires takes its peers' records with it in the same
  revision. Those peers are LOST, not GONE: they may reappear on another relay
  within seconds (coder#13041), so caches keep them, marked, for a grace
  period instead of forgetting them.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field

__all__ = ["PeerEntry", "PeerRecord", "PeerState", "peer_key"]


class PeerState(enum.Enum):
    PRESENT = "present"
    #: Its relay's lease expired; it may come back elsewhere soon.
    LOST = "lost"


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRecord:
    relay_id: str
    region: str
    since: float
    disco_key: str | None = None
    endpoints: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PeerRecord:
        obj = json.loads(data)
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in obj.items() if k in fields})


@dataclass(slots=True)
class PeerEntry:
    record: PeerRecord
    state: PeerState
    revision: int
    lost_at: float = 0.0


def peer_key(prefix: str, node_key: str) -> str:
    return f"{prefix}peers/{node_key}"
