"""serve_stun: answer STUN binding requests on a UDP port (codec in relay/stun.py).

Kept apart from the codec so that relay/stun.py stays sans-IO (no trio, no
sockets), like the frame codec.

Each datagram is handled inside its own guard: one that makes the codec
raise something unexpected is counted (``errors``), logged (the first with
its traceback, then the 2nd, 4th, 8th...) and dropped; the server goes on. What ends the loop (the
socket failing) is for the node's supervisor, which restarts it on the same
port.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from relay.protocol.stun import StunError, handle_datagram

__all__ = ["StunStats", "serve_stun"]

log = logging.getLogger(__name__)


@dataclass
class StunStats:
    requests: int = 0
    malformed: int = 0
    #: Datagrams whose handling raised an unexpected exception (dropped).
    errors: int = 0


async def serve_stun(
    host: str,
    port: int,
    *,
    stats: StunStats | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer binding requests on ``host:port`` (UDP) until cancelled; started() with the port."""
    stats = stats if stats is not None else StunStats()
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind((host, port))
        task_status.started(sock.getsockname()[1])
        while True:
            data, addr = await sock.recvfrom(2048)
            try:
                reply = handle_datagram(data, addr[0], addr[1])
            except StunError as exc:
                stats.malformed += 1
                log.debug("ignoring a malformed STUN datagram from %s: %s", addr, exc)
                continue
            except Exception as exc:
                stats.errors += 1
                n = stats.errors
                if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a flood cannot flood the log
                    log.error(
                        "STUN datagram from %s not handled (%d so far): %r",
                        addr,
                        n,
                        exc,
                        exc_info=exc if n == 1 else None,
                    )
                continue
            stats.requests += 1
            try:
                await sock.sendto(reply, addr)
            except OSError as exc:  # e.g. the sender's network is unreachable
                log.debug("cannot answer %s: %s", addr, exc)
