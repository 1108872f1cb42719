"""EtcdStore: the Store contract on a real etcd cluster, through ``etcd3``.

``etcd3`` is a blocking gRPC client, so every call runs in a worker thread
(``trio.to_thread.run_sync``) under a deadline, and watch callbacks, which
arrive on etcd3's own thread, cross back with ``trio.from_thread`` into a
bounded memory channel. A watch that would overflow that channel is ended
instead of blocking etcd3's thread; the consumer resynchronises.

Several endpoints (a cluster) are given to gRPC as one target with the
``pick_first`` policy, so when the member in use goes away gRPC moves to the
next one on its own; hostnames are resolved when the store is opened.

When etcd goes away, gRPC retries its connection at most ``_RECONNECT_MAX_MS``
apart, so a store that comes back is usable again within that; etcd3's watch
thread, which reopens its stream the moment one fails (a busy loop while etcd
is down), opens one stream per ``_WATCH_REOPEN_S`` at most.

Closing the store first detaches the watches still open: the node closes its
store while the tasks that watch it are still being cancelled, and a watch
whose channel is closed under it would otherwise be told so on etcd3's
thread, whose failing callback etcd3 logs with a traceback, on every clean
stop. A watch's callback delivers nothing once its consumer has left or the
store is closing.

TLS and authentication are options: ``ca_file`` (verify etcd's certificate;
the name checked is the first endpoint's host, not the address gRPC resolved
it to), ``cert_file``/``key_file`` (a client certificate, for etcd's
``--client-cert-auth``) and ``user``/``password`` (etcd's own auth). etcd3
authenticates once, when the client is created; an etcd that forgot the token
(restarted, or the token's TTL passed) answers "invalid auth token", and the
store then authenticates again and retries the call once.

etcd3 (0.12) is unmaintained and its generated protobuf code needs
``protobuf<4``: pyproject pins that. All of it stays behind the Store protocol.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar
from urllib.parse import urlsplit

import trio

from .store import (
    Compacted,
    EventKind,
    KeyValue,
    LeaseNotFound,
    Snapshot,
    StoreUnavailable,
    WatchBatch,
    WatchBroken,
    WatchEvent,
)

__all__ = ["EtcdStore", "grpc_target", "open_etcd_store"]

T = TypeVar("T")

_RECONNECT_MAX_MS = 300
_WATCH_REOPEN_S = 0.25


def grpc_target(endpoints: Sequence[str]) -> str:
    """One gRPC target for several etcd endpoints (``http://host:port`` or ``host:port``)."""
    v4: list[str] = []
    v6: list[str] = []
    for ep in endpoints:
        parts = urlsplit(ep if "//" in ep else f"//{ep}")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 2379
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise StoreUnavailable(f"etcd endpoint {ep}: cannot resolve {host}: {exc}") from None
        for family, _, _, _, addr in infos:
            if family == socket.AF_INET and f"{addr[0]}:{port}" not in v4:
                v4.append(f"{addr[0]}:{port}")
            elif family == socket.AF_INET6 and f"[{addr[0]}]:{port}" not in v6:
                v6.append(f"[{addr[0]}]:{port}")
    if v4:
        return "ipv4:" + ",".join(v4)
    if v6:
        return "ipv6:" + ",".join(v6)
    raise StoreUnavailable(f"no address for etcd endpoints {', '.join(endpoints)}")


class _ParkedWatchStub:
    def __init__(self) -> None:
        self._never = threading.Event()

    def Watch(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        self._never.wait()
        return iter(())


class _PacedWatchStub:
    """etcd3's watch stub, opening a new stream no sooner than ``pace_s`` after the last."""

    def __init__(self, stub: Any, pace_s: float) -> None:
        self._stub = stub
        self._pace_s = pace_s
        self._opened = 0.0

    def Watch(self, *args: Any, **kwargs: Any) -> Any:
        wait = self._opened + self._pace_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._opened = time.monotonic()
        return self._stub.Watch(*args, **kwargs)


class EtcdStore:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout_s: float = 3.0,
        watch_buffer: int = 1024,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        import etcd3  # imported here: grpc start-up is slow and MemoryStore users do not need it
        import grpc

        self.endpoints = list(endpoints)
        self._timeout_s = timeout_s
        self._watch_buffer = watch_buffer
        self._auth = (user, password) if user is not None and password is not None else None
        target = grpc_target(self.endpoints)
        # etcd3 formats "{host}:{port}"; split our target at its last colon to fit.
        host, port = target.rsplit(":", 1)
        options: list[tuple[str, Any]] = [
            ("grpc.lb_policy_name", "pick_first"),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", _RECONNECT_MAX_MS),
        ]
        if ca_file is not None:
            first = urlsplit(endpoints[0] if "//" in endpoints[0] else f"//{endpoints[0]}")
            options.append(("grpc.ssl_target_name_override", first.hostname or "127.0.0.1"))
        where = ",".join(self.endpoints)
        try:
            self._client = etcd3.client(
                host=host,
                port=int(port),
                timeout=timeout_s,
                ca_cert=ca_file,
                cert_cert=cert_file,
                cert_key=key_file,
                user=user,
                password=password,
                grpc_options=options,
            )
        except OSError as exc:
            raise StoreUnavailable(
                f"etcd {where}: cannot read {exc.filename}: {exc.strerror}"
            ) from None
        except grpc.RpcError as exc:
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise StoreUnavailable(
                f"etcd {where}: cannot authenticate as {user!r}: {details}"
            ) from None
        watcher = self._client.watcher
        watcher._watch_stub = _PacedWatchStub(watcher._watch_stub, _WATCH_REOPEN_S)
        self._etcd3 = etcd3
        #: Watches open now (etcd3's ids); aclose() detaches them before the channel goes.
        self._watches: set[int] = set()
        self._closing = False

    async def aclose(self) -> None:
        self._closing = True
        watcher = self._client.watcher
        with watcher._lock:
            # The channel is about to close, and each stream with it: forget the callbacks
            # (no cancel request, whose queue may be full with etcd away), so that the
            # stream's end is reported to nobody.
            for watch_id in self._watches:
                watcher._callbacks.pop(watch_id, None)
        self._watches.clear()
        if watcher._callback_thread is not None:
            # etcd3's watch thread loops for ever and dies with an error once the
            # channel is closed under it. Park it on a stub that never answers, and
            # end its current stream, so it goes quiet instead.
            watcher._watch_stub = _ParkedWatchStub()
            watcher._request_queue.put(None)
        await trio.to_thread.run_sync(self._client.close)

    def _authenticate(self) -> None:
        """A new token for every later call, the watch stream's included (blocking)."""
        assert self._auth is not None
        client = self._client
        resp = client.auth_stub.Authenticate(
            self._etcd3.etcdrpc.AuthenticateRequest(name=self._auth[0], password=self._auth[1]),
            client.timeout,
        )
        client.metadata = (("token", resp.token),)
        client.call_credentials = None
        client.watcher._metadata = client.metadata
        client.watcher._credentials = None

    def _with_token(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn``, authenticating again and retrying once if etcd forgot our token."""
        if self._auth is None:
            return fn
        import grpc

        def call(*args: Any, **kwargs: Any) -> T:
            try:
                return fn(*args, **kwargs)
            except grpc.RpcError as exc:
                details = exc.details() if hasattr(exc, "details") else ""
                if "invalid auth token" not in str(details):
                    raise
            self._authenticate()
            return fn(*args, **kwargs)

        return call

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        import grpc

        exc_mod = self._etcd3.exceptions
        try:
            with trio.fail_after(self._timeout_s + 1):
                return await trio.to_thread.run_sync(
                    functools.partial(self._with_token(fn), *args, **kwargs),
                    abandon_on_cancel=True,
                )
        except trio.TooSlowError:
            raise StoreUnavailable("etcd did not answer in time") from None
        except exc_mod.RevisionCompactedError:
            raise
        except exc_mod.Etcd3Exception as exc:
            raise StoreUnavailable(f"etcd: {exc or type(exc).__name__}") from None
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if code == grpc.StatusCode.NOT_FOUND and "lease" in str(details):
                raise LeaseNotFound(str(details)) from None
            raise StoreUnavailable(f"etcd: {details}") from None

    async def get_prefix(self, prefix: str) -> Snapshot:
        def read() -> Snapshot:
            resp = self._client.get_prefix_response(prefix)
            items = [
                KeyValue(kv.key.decode(), kv.value, kv.mod_revision, kv.lease) for kv in resp.kvs
            ]
            return Snapshot(resp.header.revision, sorted(items, key=lambda kv: kv.key))

        return await self._call(read)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        def write() -> int:
            resp = self._client.put(key, value, lease=lease or None)
            return int(resp.header.revision)

        return await self._call(write)

    async def delete(self, key: str, *, if_value: bytes | None = None) -> bool:
        client = self._client

        def remove() -> bool:
            if if_value is None:
                return bool(client.delete(key))
            ok, _ = client.transaction(
                compare=[client.transactions.value(key) == if_value],
                success=[client.transactions.delete(key)],
                failure=[],
            )
            return bool(ok)

        return await self._call(remove)

    async def grant_lease(self, ttl_s: int) -> int:
        lease = await self._call(self._client.lease, ttl_s)
        return int(lease.id)

    async def keepalive(self, lease: int) -> None:
        def refresh() -> int:
            responses = list(self._client.refresh_lease(lease))
            return int(responses[0].TTL) if responses else 0

        if await self._call(refresh) <= 0:
            raise LeaseNotFound(f"lease {lease:x} not found")

    async def revoke(self, lease: int) -> None:
        with suppress(LeaseNotFound):
            await self._call(self._client.revoke_lease, lease)

    @asynccontextmanager
    async def watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[trio.MemoryReceiveChannel[WatchBatch]]:
        send, receive = trio.open_memory_channel[WatchBatch](self._watch_buffer)
        token = trio.lowlevel.current_trio_token()
        broken = False
        exc_mod = self._etcd3.exceptions

        def deliver(batch: WatchBatch) -> None:
            nonlocal broken
            if broken:
                return
            try:
                send.send_nowait(batch)
                if isinstance(batch, WatchBroken):
                    broken = True
                    send.close()
            except trio.WouldBlock:
                broken = True
                send.close()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                # The consumer left (its receive side is closed): nobody to tell.
                broken = True

        def callback(resp: Any) -> None:  # on etcd3's thread
            if broken or self._closing:
                return  # a watch being cancelled, or a store being closed: expected
            if isinstance(resp, Exception):
                batch: WatchBatch = WatchBroken(f"watch ended: {resp}")
            else:
                batch = [
                    WatchEvent(
                        EventKind.PUT
                        if isinstance(ev, self._etcd3.events.PutEvent)
                        else EventKind.DELETE,
                        ev.key.decode(),
                        ev.value,
                        ev.mod_revision,
                    )
                    for ev in resp.events
                ]
                if not batch:
                    return  # progress notification
            with suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(deliver, batch, trio_token=token)

        def add() -> int:
            return int(
                self._client.add_watch_prefix_callback(
                    prefix, callback, start_revision=start_revision
                )
            )

        try:
            watch_id = await self._call(add)
        except exc_mod.RevisionCompactedError as exc:
            raise Compacted(exc.compacted_revision) from None
        self._watches.add(watch_id)
        try:
            yield receive
        finally:
            # Before the receive side closes: a batch on its way is then dropped quietly.
            broken = True
            receive.close()
            if watch_id in self._watches:
                self._watches.discard(watch_id)
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(self._timeout_s),
                    suppress(StoreUnavailable),
                ):
                    await self._call(self._client.cancel_watch, watch_id)


@asynccontextmanager
async def open_etcd_store(endpoints: Sequence[str], **options: Any) -> AsyncIterator[EtcdStore]:
    store = await trio.to_thread.run_sync(functools.partial(EtcdStore, endpoints, **options))
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
