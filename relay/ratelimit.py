"""A token bucket that tells a reader how long to pause; no clock of its own.

The relay throttles a client that sends faster than ``rate`` bytes/s by
sleeping in that client's reader, which pushes back through TCP to the
sender: nothing is dropped, the sender just goes slower (derp does the
same). ``burst`` bytes may arrive at once above the rate.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    def take(self, n: int, now: float) -> float:
        """Spend ``n`` bytes at time ``now``; the pause (seconds) that keeps within the rate."""
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - n
        self._last = now
        return -self._tokens / self.rate if self._tokens < 0 else 0.0
