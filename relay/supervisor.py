"""Supervision of a node's components: one component's failure is not the node's.

A relay node runs several long-lived components (the WebSocket server, the
HTTP API, the STUN server, the shared state, the mesh, the health reporter),
each a ``serve_x(*, task_status)`` that runs until cancelled. The
:class:`Supervisor` runs each one in its own task:

- **At start** a component's failure is the node's: a port that is taken or a
  bad configuration must reach the operator as one clear error, not a retry
  loop. :meth:`Supervisor.start` returns what the component passed to
  ``started()`` or raises what it raised.
- **Once started**, an unexpected exception (or an unexpected return) is
  logged once with the component's name (the traceback the first time, one
  line while the same failure repeats), counted in :attr:`restarts`, and the
  component is started again after a capped, jittered exponential backoff:
  uniform in [c/2, c] where c starts at ``initial_s`` and doubles up to
  ``max_s``; it falls back to ``initial_s`` once a run lasted ``stable_s``.
  A restart that fails before ``started()`` (the port is briefly taken) is
  one more failure, retried the same way.

Cancellation is never a failure: cancelling the node stops every component.
A component that must come back on the same port reads it from the object
it serves (the restart factory is called for every run).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from relay.protocol.backoff import Backoff

__all__ = ["Supervisor", "SupervisorStats"]

log = logging.getLogger(__name__)

#: First restart delay (seconds, upper bound of the jittered delay).
RESTART_INITIAL_S = 0.1
#: Largest restart delay.
RESTART_MAX_S = 10.0
#: A run this long resets the backoff to its first step.
RESTART_STABLE_S = 30.0

Component = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorStats:
    #: Components running now.
    running: tuple[str, ...]
    #: Restarts per component since the node started.
    restarts: dict[str, int]
    #: The last failure per component, as one line.
    last_failure: dict[str, str]


class Supervisor:
    def __init__(
        self,
        *,
        initial_s: float = RESTART_INITIAL_S,
        max_s: float = RESTART_MAX_S,
        stable_s: float = RESTART_STABLE_S,
    ) -> None:
        self._initial = initial_s
        self._max = max_s
        self._stable = stable_s
        # Written by each component's supervising task.
        self._restarts: Counter[str] = Counter()
        self._last: dict[str, str] = {}
        self._running: set[str] = set()

    def statistics(self) -> SupervisorStats:
        return SupervisorStats(
            running=tuple(sorted(self._running)),
            restarts=dict(self._restarts),
            last_failure=dict(self._last),
        )

    async def start(self, nursery: trio.Nursery, name: str, component: Component) -> Any:
        """Run ``component`` in ``nursery`` under supervision; what it passed to started().

        ``component(task_status=...)`` is called for every run. An exception
        before the first started() propagates: the node cannot start.
        """
        return await nursery.start(self._supervise, name, component)

    async def _supervise(
        self, name: str, component: Component, *, task_status: trio.TaskStatus[Any]
    ) -> None:
        backoff = Backoff(self._initial, self._max)
        first = True
        while True:
            began = trio.current_time()
            try:
                async with trio.open_nursery() as nursery:
                    value = await nursery.start(component)
                    self._running.add(name)
                    if first:
                        first = False
                        task_status.started(value)
                why = "stopped on its own"
                exc: BaseException | None = None
            except Exception as err:
                if first:
                    # Ungrouped: the operator reads "address in use", not a nursery's group.
                    raise _sole(err) from None
                why, exc = _one_line(err), err
            finally:
                self._running.discard(name)
            self._restarts[name] += 1
            if trio.current_time() - began >= self._stable:
                backoff.reset()
            delay = backoff.next()
            if self._last.get(name) != why:
                # The traceback once per distinct failure; a repeat is one line.
                log.error(
                    "component %s failed: %s; restarting in %.2f s",
                    name,
                    why,
                    delay,
                    exc_info=exc,
                )
            else:
                log.warning(
                    "component %s failed again (%d restarts): %s; restarting in %.2f s",
                    name,
                    self._restarts[name],
                    why,
                    delay,
                )
            self._last[name] = why
            await trio.sleep(delay)


def _sole(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups, or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _one_line(exc: BaseException) -> str:
    """The innermost failure of a (possibly grouped) exception, as one line."""
    exc = _sole(exc)
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
