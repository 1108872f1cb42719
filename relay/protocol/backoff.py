"""The retry schedule every reconnecting or restarting loop follows, sans-IO.

Jittered exponential backoff: the n-th delay (from 0) is uniform in [c/2, c]
where c = min(max_s, initial_s * 2**n). Half the cap is kept so retries never
come back all at once; the other half is random so a thousand clients of a
relay that restarted spread their reconnects instead of arriving together.

Only the delays are computed here: the caller sleeps (trio, or anything else),
so this module, like the rest of the package, needs no event loop. Users: the
relay client's reconnects (relay/client.py), the shared state's retry loops
(coordinator/state.py), the node's component restarts (relay/supervisor.py)
and mesh link reopening (relay/mesh.py).
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]

#: Doublings beyond this change nothing (the cap is reached long before) and
#: would only grow the float.
_MAX_DOUBLINGS = 30


class Backoff:
    """Jittered exponential backoff: uniform in [c/2, c], c doubling up to ``max_s``.

    :meth:`next` gives the delay for the failure count so far and counts one
    more; :meth:`reset` starts over. A caller that keeps its own count asks
    :meth:`delay` for that step.
    """

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._initial = initial_s
        self._max = max_s
        self._n = 0

    def delay(self, step: int) -> float:
        cap = min(self._max, self._initial * 2 ** min(step, _MAX_DOUBLINGS))
        return random.uniform(cap / 2, cap)

    def next(self) -> float:
        delay = self.delay(self._n)
        self._n += 1
        return delay

    def reset(self) -> None:
        self._n = 0
