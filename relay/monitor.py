"""The I/O half of mesh health: status collection and active probes.

Every ``interval_s`` a relay's :class:`MeshMonitor`

- probes every path that starts here, as a user's packets go: a *sender*
  probe client connected to this relay sends a sealed ping to an *echo* probe
  client connected to the target relay, through this relay and the mesh link;
  the echo client answers with a sealed pong the same way back. The path to
  this relay itself (sender and echo client both here) proves local delivery.
  One ping per path per round, at most ``max_probe_targets`` paths: the cost
  is one echo connection per probed relay and two small packets per path and
  round. The probe clients prove the mesh key with a probe flag in their
  handshake (relay/protocol/handshake.py), so relays leave them out of their
  client counts. Each relay probes only its own row of the matrix; the full matrix
  is assembled from every relay's status, so the mesh as a whole sends each
  probe once, whoever serves the dashboard.
- reads ``/api/v1/status`` of every relay in the registry (itself included,
  over HTTP like the rest, so its own figures take the same path), at most
  ``_FETCH_CONCURRENCY`` at a time, each under the probe timeout;
- folds the round, with the peer map's client homes (for failover events),
  into :class:`relay.health.MeshHealth`, whose document is what
  ``/api/v1/mesh`` serves.
"""

from __future__ import annotations

import logging
import os
import ssl
import struct
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from coordinator.registry import RelayRecord
from relay.protocol.keys import NodeKey, PrivateKey, Sealer, SealError

from .client import RelayClient, RelayClosedError
from .config import HealthConfig
from .health import Fetch, HealthThresholds, MeshHealth

__all__ = ["MeshMonitor", "ProbeResult", "Prober"]

log = logging.getLogger(__name__)

_FETCH_CONCURRENCY = 32
_MAGIC = b"RMPRB\x01"
_PING = b"?"
_PONG = b"!"
_SEQ = struct.Struct(">Q")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    src: str
    dst: str
    ok: bool
    rtt_ms: float | None
    #: Wall-clock time of the probe.
    at: float
    #: Consecutive failures (0 after a success).
    failures: int
    sent: int
    received: int
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "ok": self.ok,
            "rtt_ms": self.rtt_ms,
            "at": self.at,
            "failures": self.failures,
            "sent": self.sent,
            "received": self.received,
            "error": self.error,
        }


class _Echo:
    """The echo probe client on one target relay: answers the sender's pings, nothing else."""

    def __init__(
        self,
        record: RelayRecord,
        sender: NodeKey,
        timeout_s: float,
        probe_key: bytes | None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.record = record
        self.key = PrivateKey.generate()
        self.client = RelayClient(
            [record.ws_url],
            self.key,
            mesh_key=probe_key,
            probe=probe_key is not None,
            send_queue_packets=64,
            receive_queue_packets=64,
            connect_timeout_s=timeout_s,
            backoff_max_s=1.0,
            ssl_context=ssl_context,
        )
        self._sender = sender
        self._sealer = Sealer(self.key)
        self.scope = trio.CancelScope()
        self.connected_since: float | None = None

    async def run(self) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: self.client.run(
                        first_must_succeed=False, task_status=task_status
                    )
                )
                while True:
                    try:
                        packet = await self.client.receive()
                    except RelayClosedError:
                        return
                    if packet.src != self._sender:
                        continue  # not an open reflector: only our sender is answered
                    try:
                        body = self._sealer.open(packet.src, packet.payload)
                    except SealError:
                        continue
                    if body.startswith(_MAGIC + _PING):
                        pong = _MAGIC + _PONG + body[len(_MAGIC) + 1 :]
                        self.client.send_nowait(packet.src, self._sealer.seal(packet.src, pong))


class Prober:
    """Probes the paths from this relay to each target relay, one ping per path per round."""

    def __init__(
        self,
        me: Callable[[], RelayRecord],
        cfg: HealthConfig,
        probe_key: bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``probe_key``: the mesh key (or the lone relay's probe secret) that marks the
        probe clients as such; without it they count as ordinary clients."""
        self._me = me
        self._probe_key = probe_key
        self._ssl_context = ssl_context
        self._timeout = cfg.probe_timeout_s
        self._max_targets = cfg.max_probe_targets
        self.key = PrivateKey.generate()
        self._sealer = Sealer(self.key)
        self._sender: RelayClient | None = None
        self._echoes: dict[str, _Echo] = {}
        self._waiting: dict[int, trio.Event] = {}
        self._seq = int.from_bytes(os.urandom(4), "big") << 16
        self._counts: dict[str, tuple[int, int, int]] = {}  # sent, received, failures
        self.results: dict[str, ProbeResult] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        me = self._me()
        self._sender = RelayClient(
            [me.ws_url],
            self.key,
            mesh_key=self._probe_key,
            probe=self._probe_key is not None,
            send_queue_packets=self._max_targets + 16,
            receive_queue_packets=self._max_targets + 16,
            connect_timeout_s=self._timeout,
            backoff_max_s=1.0,
            ssl_context=self._ssl_context,
        )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await nursery.start(
                    lambda task_status: self._sender.run(  # type: ignore[union-attr]
                        first_must_succeed=False, task_status=task_status
                    )
                )
                task_status.started()
                while True:
                    packet = await self._sender.receive()
                    try:
                        body = self._sealer.open(packet.src, packet.payload)
                    except SealError:
                        continue
                    if body.startswith(_MAGIC + _PONG) and len(body) == len(_MAGIC) + 1 + 8:
                        (seq,) = _SEQ.unpack_from(body, len(_MAGIC) + 1)
                        done = self._waiting.get(seq)
                        if done is not None:
                            done.set()
            finally:
                self._nursery = None

    def targets(self, relays: list[RelayRecord]) -> list[RelayRecord]:
        """This relay first, then its region, then the rest; at most ``max_probe_targets``."""
        me = self._me()
        ordered = sorted(
            relays,
            key=lambda r: (r.relay_id != me.relay_id, r.region != me.region, r.region, r.relay_id),
        )
        return ordered[: self._max_targets]

    def reconcile(self, relays: list[RelayRecord]) -> list[RelayRecord]:
        """Echo clients on exactly the relays to probe (moved relays get a new one)."""
        targets = self.targets(relays)
        wanted = {r.relay_id: r for r in targets}
        for rid, echo in list(self._echoes.items()):
            if rid not in wanted or wanted[rid].ws_url != echo.record.ws_url:
                echo.scope.cancel()
                del self._echoes[rid]
        for rid in [rid for rid in self.results if rid not in wanted]:
            del self.results[rid]
            self._counts.pop(rid, None)
        if self._nursery is not None and self._sender is not None:
            for rid, record in wanted.items():
                if rid not in self._echoes:
                    echo = _Echo(
                        record,
                        self._sender.public_key,
                        self._timeout,
                        self._probe_key,
                        self._ssl_context,
                    )
                    self._echoes[rid] = echo
                    self._nursery.start_soon(echo.run)
        return targets

    async def probe_all(self, targets: list[RelayRecord]) -> None:
        async with trio.open_nursery() as nursery:
            for record in targets:
                nursery.start_soon(self._probe, record)

    async def _probe(self, record: RelayRecord) -> None:
        rid = record.relay_id
        echo = self._echoes.get(rid)
        sender = self._sender
        sent, received, failures = self._counts.get(rid, (0, 0, 0))
        now = trio.current_time()
        error: str | None = None
        rtt: float | None = None
        echo_since: float | None = None
        if sender is None or not sender.connected:
            error = "the probe client cannot connect to this relay"
        elif echo is None or not echo.client.connected:
            error = f"the probe client cannot connect to {rid}"
        else:
            if echo.connected_since is None:
                echo.connected_since = now
            echo_since = echo.connected_since
            self._seq += 1
            seq = self._seq
            done = self._waiting[seq] = trio.Event()
            payload = self._sealer.seal(echo.key.public, _MAGIC + _PING + _SEQ.pack(seq))
            start = trio.current_time()
            try:
                if sender.send_nowait(echo.key.public, payload):
                    sent += 1
                    with trio.move_on_after(self._timeout):
                        await done.wait()
                    if done.is_set():
                        rtt = trio.current_time() - start
                        received += 1
                    else:
                        error = f"no answer within {self._timeout:g} s"
                else:
                    error = "the probe client's send queue is full"
            finally:
                del self._waiting[seq]
        if echo is not None and not echo.client.connected:
            echo.connected_since = None
        # A fresh echo client may not be routable yet (the registry has to spread
        # its record first): its first unanswered probe is not held against the path.
        new = echo is not None and echo_since is not None and now - echo_since < self._timeout
        failures = 0 if rtt is not None else (failures if new else failures + 1)
        self._counts[rid] = (sent, received, failures)
        self.results[rid] = ProbeResult(
            src=self._me().relay_id,
            dst=rid,
            ok=rtt is not None,
            rtt_ms=round(rtt * 1000, 3) if rtt is not None else None,
            at=time.time(),
            failures=failures,
            sent=sent,
            received=received,
            error=error,
        )

    def close_all(self) -> None:
        for echo in self._echoes.values():
            echo.scope.cancel()
        self._echoes.clear()


class MeshMonitor:
    """Runs the rounds; ``document()`` is the latest mesh status (None before the first)."""

    def __init__(
        self,
        cfg: HealthConfig,
        *,
        me: Callable[[], RelayRecord],
        relays: Callable[[], list[RelayRecord]],
        regions: list[str] | None = None,
        homes: Callable[[], Iterable[tuple[bytes, str]]] | None = None,
        departed: Callable[[], Collection[str]] | None = None,
        probe_key: bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``homes``: the peer map's client keys and their relays, ``departed``: the
        relays that left after announcing a planned stop (see MeshHealth.update);
        ``probe_key``: see :class:`Prober`."""
        self.cfg = cfg
        #: What wss:// and https:// relays are verified with (None: the system's store).
        self._ssl_context = ssl_context
        self._me = me
        self._relays = relays
        self._homes = homes
        self._departed = departed
        interval = cfg.interval_s
        self.thresholds = HealthThresholds(
            interval_s=interval,
            stale_after_s=cfg.stale_after_s or 3 * interval,
            probe_failures=cfg.probe_failures,
            drops_high_per_s=cfg.drops_high_per_s,
            forget_after_s=cfg.forget_after_s,
        )
        self.prober = Prober(me, cfg, probe_key, ssl_context)
        self.health = MeshHealth(me().relay_id, self.thresholds, regions=regions or [])
        self.rounds = 0
        self._round_done = trio.Event()

    def document(self) -> dict[str, Any] | None:
        return self.health.doc

    def probe_results(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.prober.results.values()]

    async def wait_round(self) -> None:
        """Until the next collection round has finished."""
        await self._round_done.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.health.served_by = self._me().relay_id
        async with (
            httpx.AsyncClient(
                timeout=self.cfg.probe_timeout_s, verify=self._ssl_context or True
            ) as http,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(self.prober.run)
            task_status.started()
            limiter = trio.CapacityLimiter(_FETCH_CONCURRENCY)
            try:
                while True:
                    started = trio.current_time()
                    await self._round(http, limiter)
                    self.rounds += 1
                    self._round_done.set()
                    self._round_done = trio.Event()
                    await trio.sleep_until(started + self.cfg.interval_s)
            finally:
                self.prober.close_all()

    async def _round(self, http: httpx.AsyncClient, limiter: trio.CapacityLimiter) -> None:
        me = self._me()
        registry = list(self._relays())
        if not any(r.relay_id == me.relay_id for r in registry):
            registry.append(me)
        targets = self.prober.reconcile(registry)
        await self.prober.probe_all(targets)
        fetches: dict[str, Fetch] = {}

        async def fetch(record: RelayRecord) -> None:
            async with limiter:
                fetches[record.relay_id] = await _fetch_status(http, record)

        async with trio.open_nursery() as nursery:
            for record in registry:
                nursery.start_soon(fetch, record)
        self.health.update(
            time.time(),
            registry,
            fetches,
            self._homes() if self._homes is not None else None,
            departed=self._departed() if self._departed is not None else (),
        )


async def _fetch_status(http: httpx.AsyncClient, record: RelayRecord) -> Fetch:
    if not record.http_url:
        return Fetch(error="no HTTP URL in the registry")
    try:
        resp = await http.get(record.http_url + "/api/v1/status")
    except httpx.TimeoutException:
        return Fetch(error="status request timed out")
    except httpx.HTTPError as exc:
        return Fetch(error=f"status unreachable: {type(exc).__name__}")
    if resp.status_code != 200:
        return Fetch(error=f"status answered HTTP {resp.status_code}")
    try:
        doc = resp.json()
    except ValueError:
        return Fetch(error="status is not JSON")
    if not isinstance(doc, dict):
        return Fetch(error="status is not a JSON object")
    return Fetch(doc=doc)
