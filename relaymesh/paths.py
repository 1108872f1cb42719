"""Path choice for one peer: relayed until a direct UDP path is proven, and back.

A pure state machine (time comes in as arguments); coordinator/peer.py does
the I/O. The rules:

- Packets go through the relay until a Pong has come back on a direct
  endpoint: an unconfirmed path never carries data, so nothing is lost while
  a path is being tried.
- Discovery (a CallMeMaybe through the relay, and Pings to every candidate
  endpoint, from the same UDP socket the other side pings back to, so both
  NATs open) runs on first traffic, then every ``retry_s`` while there is no
  direct path.
- The lowest round trip wins; a confirmed path is replaced only by one
  clearly faster (``switch_ratio`` of its round trip, and 1 ms at least).
- Heartbeats: every ``idle_heartbeat_s`` (3 s); every ``active_heartbeat_s``
  while data flows on the path. A path is trusted ``trust_s`` (6.5 s) after
  its last Pong when idle, but only ``active_silence_s`` when data flows:
  when replies stop mid-stream the peer falls back to the relay at once, so
  the packets lost in an unannounced cut are the ones sent in that window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from relay.protocol.disco import Addr, new_txid
from relay.protocol.keys import NodeKey

__all__ = ["Action", "PathConfig", "PathInfo", "PeerPath"]


@dataclass(frozen=True, slots=True)
class PathConfig:
    idle_heartbeat_s: float = 3.0
    active_heartbeat_s: float = 0.2
    trust_s: float = 6.5
    active_silence_s: float = 0.6
    active_window_s: float = 1.0
    retry_s: float = 5.0
    switch_ratio: float = 0.8
    max_candidates: int = 16


@dataclass(frozen=True, slots=True)
class Action:
    """What the I/O side should do: ``ping`` an endpoint, or send ``call_me_maybe``."""

    kind: str
    addr: Addr | None = None
    txid: bytes = b""


@dataclass(frozen=True, slots=True)
class PathInfo:
    direct: bool
    addr: Addr | None
    rtt_ms: float | None


@dataclass
class PeerPath:
    node: NodeKey
    config: PathConfig = field(default_factory=PathConfig)
    disco_key: NodeKey | None = None
    candidates: dict[Addr, float] = field(default_factory=dict)
    best: Addr | None = None
    best_rtt_s: float | None = None
    last_pong: float = -math.inf
    last_ping_to_best: float = -math.inf
    last_discovery: float = -math.inf
    last_direct_send: float = -math.inf
    pending: dict[bytes, tuple[Addr, float]] = field(default_factory=dict)
    # counters
    upgrades: int = 0
    fallbacks: int = 0
    sent_direct_since_pong: int = 0
    lost_in_cuts: int = 0

    # ---- what the I/O side tells us ----------------------------------------

    def learn(self, disco_key: NodeKey | None, endpoints: list[Addr], now: float) -> None:
        if disco_key is not None:
            self.disco_key = disco_key
        for ep in endpoints:
            if ep[1] and ep[0] not in ("0.0.0.0", "::"):
                self.candidates[ep] = now
        while len(self.candidates) > self.config.max_candidates:
            oldest = min(self.candidates, key=self.candidates.__getitem__)
            del self.candidates[oldest]

    def sent_direct(self, now: float) -> None:
        self.last_direct_send = now
        self.sent_direct_since_pong += 1

    def on_pong(self, txid: bytes, now: float) -> bool:
        """A Pong for one of our Pings: True if it was ours."""
        sent = self.pending.pop(txid, None)
        if sent is None:
            return False
        addr, at = sent
        rtt = now - at
        if self.best == addr:
            self.best_rtt_s = rtt
            self.last_pong = now
            self.sent_direct_since_pong = 0
            return True
        if self.best is None or self.direct_addr(now) is None:
            if self.best is None:
                self.upgrades += 1
            self.best, self.best_rtt_s, self.last_pong = addr, rtt, now
            self.sent_direct_since_pong = 0
        elif self.best_rtt_s is not None and rtt < min(
            self.best_rtt_s * self.config.switch_ratio, self.best_rtt_s - 0.001
        ):
            self.best, self.best_rtt_s, self.last_pong = addr, rtt, now
        return True

    # ---- what the I/O side asks --------------------------------------------

    def _active(self, now: float) -> bool:
        return now - self.last_direct_send <= self.config.active_window_s

    def direct_addr(self, now: float) -> Addr | None:
        """The endpoint to send data to now, or None: use the relay."""
        if self.best is None:
            return None
        limit = self.config.active_silence_s if self._active(now) else self.config.trust_s
        if now - self.last_pong > limit:
            return None
        return self.best

    def info(self, now: float) -> PathInfo:
        addr = self.direct_addr(now)
        rtt = self.best_rtt_s * 1000 if addr is not None and self.best_rtt_s is not None else None
        return PathInfo(direct=addr is not None, addr=addr, rtt_ms=rtt)

    def want_discovery(self, now: float) -> None:
        """First traffic: discover as soon as the peer's disco key is known."""
        if self.best is None and self.last_discovery == -math.inf:
            self.last_discovery = now - self.config.retry_s

    def due(self, now: float) -> list[Action]:
        actions: list[Action] = []
        cfg = self.config
        for txid, (_, at) in list(self.pending.items()):
            if now - at > max(2.0, cfg.trust_s / 2):
                del self.pending[txid]
        if self.best is not None and self.direct_addr(now) is None:
            # Replies stopped: back to the relay now, and try again later.
            self.lost_in_cuts += self.sent_direct_since_pong
            self.sent_direct_since_pong = 0
            self.best = None
            self.best_rtt_s = None
            self.fallbacks += 1
            self.last_discovery = now
        if self.best is not None:
            interval = cfg.active_heartbeat_s if self._active(now) else cfg.idle_heartbeat_s
            if now - self.last_ping_to_best >= interval:
                self.last_ping_to_best = now
                actions.append(self._ping(self.best, now))
            return actions
        if self.disco_key is None or now - self.last_discovery < cfg.retry_s:
            return actions
        self.last_discovery = now
        return [Action("call_me_maybe"), *self.ping_candidates(now)]

    def ping_candidates(self, now: float) -> list[Action]:
        """A Ping to every candidate endpoint (discovery, or a CallMeMaybe just arrived)."""
        return [self._ping(addr, now) for addr in self.candidates]

    def ping_from_peer(self, addr: Addr, now: float) -> list[Action]:
        """The peer pinged us from ``addr``: learn it, and ping back if we have no path yet.

        Ping back even if a ping to ``addr`` is already pending: that one most
        likely reached the peer's NAT before the peer's own ping opened it, and
        was dropped. Now the way is open. (At most one every 5 ms per address.)
        """
        self.learn(None, [addr], now)
        if self.direct_addr(now) is not None:
            return []
        recent = any(a == addr and now - at < 0.005 for a, at in self.pending.values())
        return [] if recent else [self._ping(addr, now)]

    def _ping(self, addr: Addr, now: float) -> Action:
        txid = new_txid()
        self.pending[txid] = (addr, now)
        return Action("ping", addr, txid)
