"""Choosing the home relay, with hysteresis so it does not flap.

The lessons of tailscale#8603, #13969, #20929, made into rules:

- A region's latency is the **best** it measured over the last ``window_s``
  (5 minutes), not the last sample: one slow or lost probe changes nothing.
- A lost probe is no sample at all, never "infinitely slow".
- Move to another region only if it is at least ``min_gain_ms`` (10 ms)
  faster **and** at least a third faster (new at most 2/3 of current) than home.
- If home has no sample in the window but its relay is still passing
  traffic (``home_alive``), stay: the probes are what failed, not the relay.
  Only a home with no samples and no working connection is abandoned.
- Within the home region the relay stays the same unless it is down.

Pure: time comes in as arguments (tests drive it with a fake clock).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["HomeChoice", "HomeSelector"]


@dataclass(frozen=True, slots=True)
class HomeChoice:
    region: str
    relay: str
    changed: bool
    reason: str


class HomeSelector:
    def __init__(
        self, *, window_s: float = 300.0, min_gain_ms: float = 10.0, min_gain_ratio: float = 1 / 3
    ) -> None:
        self.window_s = window_s
        self.min_gain_ms = min_gain_ms
        self.min_gain_ratio = min_gain_ratio
        self._samples: dict[str, deque[tuple[float, float]]] = {}
        self._relay_samples: dict[str, deque[tuple[float, float]]] = {}
        self._relay_region: dict[str, str] = {}
        self.home: HomeChoice | None = None

    def observe(
        self,
        now: float,
        region_ms: dict[str, float],
        relay_ms: dict[str, float] | None = None,
        relay_region: dict[str, str] | None = None,
    ) -> None:
        for region, ms in region_ms.items():
            self._samples.setdefault(region, deque()).append((now, ms))
        for relay, ms in (relay_ms or {}).items():
            self._relay_samples.setdefault(relay, deque()).append((now, ms))
        self._relay_region.update(relay_region or {})

    def _best(
        self, series: dict[str, deque[tuple[float, float]]], key: str, now: float
    ) -> float | None:
        q = series.get(key)
        if not q:
            return None
        while q and q[0][0] < now - self.window_s:
            q.popleft()
        return min((ms for _, ms in q), default=None)

    def choose(
        self, now: float, *, home_alive: bool = True, relays_up: set[str] | None = None
    ) -> HomeChoice | None:
        bests = {
            r: b
            for r in list(self._samples)
            if (b := self._best(self._samples, r, now)) is not None
        }
        if not bests:
            return self.home
        fastest = min(bests, key=bests.__getitem__)
        current = self.home
        if current is None:
            return self._set(fastest, now, relays_up, changed=True, reason="first choice")
        cur_ms = bests.get(current.region)
        if cur_ms is None:
            if home_alive:
                return self._keep(current, "no probe answered, but the relay passes traffic")
            return self._set(
                fastest, now, relays_up, changed=True, reason="home region unreachable"
            )
        new_ms = bests[fastest]
        if (
            fastest != current.region
            and cur_ms - new_ms >= self.min_gain_ms
            and new_ms <= cur_ms * (1 - self.min_gain_ratio)
        ):
            return self._set(
                fastest,
                now,
                relays_up,
                changed=True,
                reason=f"{fastest} {new_ms:.1f} ms vs {current.region} {cur_ms:.1f} ms",
            )
        if relays_up is not None and current.relay not in relays_up:
            return self._set(
                current.region,
                now,
                relays_up,
                changed=True,
                reason=f"relay {current.relay} is down",
            )
        return self._keep(current, "home is good enough")

    def _keep(self, current: HomeChoice, reason: str) -> HomeChoice:
        self.home = HomeChoice(current.region, current.relay, False, reason)
        return self.home

    def _set(
        self, region: str, now: float, relays_up: set[str] | None, *, changed: bool, reason: str
    ) -> HomeChoice:
        relays = [
            r
            for r, reg in self._relay_region.items()
            if reg == region and (relays_up is None or r in relays_up)
        ]
        timed = {r: b for r in relays if (b := self._best(self._relay_samples, r, now)) is not None}
        if timed:
            relay = min(timed, key=timed.__getitem__)
        elif relays:
            relay = sorted(relays)[0]
        else:
            relay = ""
        self.home = HomeChoice(region, relay, changed, reason)
        return self.home
