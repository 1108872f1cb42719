"""serve_app: serve the relay's HTTP app (relay/app.py) with hypercorn, one guard per connection.

Built from hypercorn's own per-connection TCPServer, each connection run
inside its own error boundary. ``hypercorn.trio.serve`` runs every connection
in one nursery shared with its listener, so one connection's unexpected
exception ends the whole HTTP server; and one can be provoked from outside:
a chunked request with a bad chunk header makes hypercorn's trio TCPServer
send its 400 while the app's task is half-closing the same socket
(``send_eof`` outside the send lock: ``trio.BusyResourceError``). Here that
connection is closed and counted (``HttpStats.errors``), and the others go on.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from .tls import ServerTLS

__all__ = ["HttpStats", "serve_app"]

log = logging.getLogger(__name__)

#: accept() errors that mean "out of descriptors or memory for now", not "broken".
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: How long to wait before accepting again after such an error.
_ACCEPT_PAUSE_S = 0.1


@dataclass
class HttpStats:
    #: Connections accepted.
    connections: int = 0
    #: Connections that ended in an unexpected exception (each closed, nothing else).
    errors: int = 0
    #: accept() failures by errno name (EMFILE: out of file descriptors), each waited out.
    accept_errors: dict[str, int] = field(default_factory=dict)


async def serve_app(
    app: QuartTrio,
    sock: trio.socket.SocketType,
    *,
    stats: HttpStats | None = None,
    tls: ServerTLS | None = None,
    tls_handshake_timeout_s: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``sock`` (bound and listening) until cancelled; started() at once.

    The socket is the caller's: it stays open when this returns, so a restart
    serves the same port with no window in which another process could take it.
    With ``tls``, each connection is wrapped in TLS with the certificate current
    at its accept (hypercorn runs the handshake, under ``tls_handshake_timeout_s``).
    """
    stats = stats if stats is not None else HttpStats()
    config = HypercornConfig()
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.ssl_handshake_timeout = tls_handshake_timeout_s
    asgi = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(asgi, config, lifespan_state)
    context = WorkerContext(None)
    listener = trio.SocketListener(sock)

    async def connection(tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if tls is not None:
            stream = trio.SSLStream(tcp, tls.context, server_side=True, https_compatible=True)
        try:
            # Annotated as an SSLStream, TCPServer serves a plain one too (as hypercorn does).
            state = ConnectionState(lifespan_state.copy())
            await TCPServer(asgi, config, context, state, stream).run()  # type: ignore[arg-type]
        except Exception as exc:
            stats.errors += 1
            n = stats.errors
            if n & (n - 1) == 0:  # the 1st, 2nd, 4th...: a flood cannot flood the log
                log.error(
                    "HTTP connection ended in an error (%d so far): %r",
                    n,
                    exc,
                    exc_info=exc if n == 1 else None,
                )
            with trio.CancelScope(shield=True):
                await tcp.aclose()

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                    stats.accept_errors[name] = n = stats.accept_errors.get(name, 0) + 1
                    if n & (n - 1) == 0:  # the 1st, 2nd, 4th...: ten a second would flood the log
                        log.error(
                            "HTTP accept: %s (%d so far); pausing %g s", exc, n, _ACCEPT_PAUSE_S
                        )
                    await trio.sleep(_ACCEPT_PAUSE_S)
                    continue
                stats.connections += 1
                connections.start_soon(connection, stream)
