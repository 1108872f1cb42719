"""netcheck: measure the latency to every region, and what the NAT does.

All relays are probed in parallel under one deadline:

- STUN: binding requests from one UDP socket (3 per relay on a first report,
  fewer later), each round trip timed; the answers also give the reflexive
  (public) address. If different relays see different ports, the NAT maps
  each destination separately ("hard" NAT: direct paths will not work).
- HTTP, for every relay STUN got nothing from (UDP blocked): two requests for
  ``/derp/latency-check`` over one connection; the second one's time is the
  round trip (the first pays for the TCP handshake).

A region's latency is its best relay's; the preferred region is the fastest,
and its preferred relay its fastest relay. Relays marked down in the map are
skipped.
"""

from __future__ import annotations

import ssl
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import trio

from relay.protocol.stun import StunError, decode_response, encode_request, new_transaction_id

from .model import RegionMap, RelayNode

__all__ = ["NetcheckReport", "RelayProbe", "StunProber", "run_netcheck"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayProbe:
    region: str
    node: str
    stun_ms: list[float] = field(default_factory=list)
    http_ms: float | None = None
    reflexive: str | None = None

    @property
    def best_ms(self) -> float | None:
        if self.stun_ms:
            return min(self.stun_ms)
        return self.http_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class NetcheckReport:
    udp: bool
    global_addr: str | None
    mapping_varies_by_dest: bool | None
    region_latency_ms: dict[str, float]
    relay_latency_ms: dict[str, float]
    preferred_region: str | None
    preferred_relay: str | None
    duration_ms: float
    probes: list[RelayProbe]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["probes"] = [{**asdict(p), "best_ms": p.best_ms} for p in self.probes]
        return out


class StunProber:
    """Binding requests from one socket; answers matched by transaction id.

    Either :meth:`run` reads the socket, or its owner (a Peer, whose socket
    also carries disco and data) hands it datagrams with :meth:`feed`.
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._waiting: dict[bytes, tuple[trio.Event, list[tuple[str, int]]]] = {}

    def feed(self, data: bytes) -> bool:
        """True if ``data`` was a STUN response (ours or not)."""
        try:
            tid, ip, port = decode_response(data)
        except StunError:
            return False
        entry = self._waiting.get(tid)
        if entry is not None:
            entry[1].append((ip, port))
            entry[0].set()
        return True

    async def run(self) -> None:
        while True:
            data, _ = await self.sock.recvfrom(2048)
            self.feed(data)

    async def probe(self, addr: tuple[str, int], timeout_s: float) -> tuple[float, str] | None:
        tid = new_transaction_id()
        done = trio.Event()
        answer: list[tuple[str, int]] = []
        self._waiting[tid] = (done, answer)
        try:
            start = time.perf_counter()
            try:
                await self.sock.sendto(encode_request(tid), addr)
            except OSError:
                return None
            with trio.move_on_after(timeout_s):
                await done.wait()
            if not answer:
                return None
            ip, port = answer[0]
            return (time.perf_counter() - start) * 1000, f"{ip}:{port}"
        finally:
            del self._waiting[tid]


async def _resolve(host: str, port: int) -> tuple[str, int] | None:
    try:
        infos = await trio.socket.getaddrinfo(
            host, port, trio.socket.AF_INET, trio.socket.SOCK_DGRAM
        )
    except OSError:
        return None
    return (str(infos[0][4][0]), port) if infos else None


async def _http_latency(
    node: RelayNode, timeout_s: float, ssl_context: ssl.SSLContext | None
) -> float | None:
    url = node.http_url + "/derp/latency-check"
    verify = ssl_context if ssl_context is not None else ssl.create_default_context()
    try:
        async with httpx.AsyncClient(timeout=timeout_s, verify=verify) as client:
            await client.get(url)  # connects
            start = time.perf_counter()
            resp = await client.get(url)
            elapsed = (time.perf_counter() - start) * 1000
    except httpx.HTTPError:
        return None
    return elapsed if resp.status_code in (200, 204) else None


async def run_netcheck(
    region_map: RegionMap,
    *,
    sock: trio.socket.SocketType | None = None,
    prober: StunProber | None = None,
    stun_probes: int = 3,
    deadline_s: float = 3.0,
    http_fallback: bool = True,
    ssl_context: ssl.SSLContext | None = None,
) -> NetcheckReport:
    """Probe every region of ``region_map``; see the module docstring.

    ``sock``: the UDP socket to probe from (the one direct paths will use, so
    the reflexive address is theirs). Without one, a new socket is used.
    ``prober``: a StunProber its owner feeds (then ``sock`` is not read here).
    ``ssl_context``: what https:// relays are verified with (None: the system's store).
    """
    started = time.perf_counter()
    nodes = [(r.code, n) for r in region_map.regions for n in r.nodes if n.up]
    results: dict[str, dict[str, Any]] = {
        n.name: {"stun": [], "refl": [], "http": None} for _, n in nodes
    }
    fed = prober is not None
    own = sock is None and prober is None
    if prober is None:
        if sock is None:
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await sock.bind(("0.0.0.0", 0))
        prober = StunProber(sock)
    try:
        async with trio.open_nursery() as outer:
            if not fed:
                outer.start_soon(prober.run)
            with trio.move_on_after(deadline_s):
                async with trio.open_nursery() as nursery:
                    for _, node in nodes:
                        nursery.start_soon(
                            _stun_node, prober, node, stun_probes, deadline_s, results[node.name]
                        )
            if http_fallback:
                left = max(0.5, deadline_s - (time.perf_counter() - started))
                with trio.move_on_after(left):
                    async with trio.open_nursery() as nursery:
                        for _, node in nodes:
                            if not results[node.name]["stun"]:
                                nursery.start_soon(
                                    _http_node, node, left, results[node.name], ssl_context
                                )
            outer.cancel_scope.cancel()
    finally:
        if own:
            prober.sock.close()
    probes = [
        RelayProbe(
            region=code,
            node=node.name,
            stun_ms=results[node.name]["stun"],
            http_ms=results[node.name]["http"],
            reflexive=results[node.name]["refl"][0] if results[node.name]["refl"] else None,
        )
        for code, node in nodes
    ]
    return _report(probes, (time.perf_counter() - started) * 1000)


async def _stun_node(
    prober: StunProber, node: RelayNode, n: int, deadline_s: float, out: dict[str, Any]
) -> None:
    where = node.stun_address()
    if where is None:
        return
    addr = await _resolve(*where)
    if addr is None:
        return
    per_probe = max(0.2, deadline_s / (n + 1))
    for _ in range(n):
        got = await prober.probe(addr, per_probe)
        if got is not None:
            out["stun"].append(round(got[0], 3))
            out["refl"].append(got[1])


async def _http_node(
    node: RelayNode, timeout_s: float, out: dict[str, Any], ssl_context: ssl.SSLContext | None
) -> None:
    ms = await _http_latency(node, timeout_s, ssl_context)
    if ms is not None:
        out["http"] = round(ms, 3)


def _report(probes: list[RelayProbe], duration_ms: float) -> NetcheckReport:
    relay_ms = {p.node: p.best_ms for p in probes if p.best_ms is not None}
    region_ms: dict[str, float] = {}
    for p in probes:
        if p.best_ms is not None:
            region_ms[p.region] = min(region_ms.get(p.region, float("inf")), p.best_ms)
    reflexive = [p.reflexive for p in probes if p.reflexive]
    ports = {r.rsplit(":", 1)[1] for r in reflexive}
    preferred_region = min(region_ms, key=region_ms.__getitem__) if region_ms else None
    preferred_relay = None
    if preferred_region is not None:
        candidates = [p for p in probes if p.region == preferred_region and p.best_ms is not None]
        preferred_relay = min(candidates, key=lambda p: p.best_ms or 0.0).node
    return NetcheckReport(
        udp=any(p.stun_ms for p in probes),
        global_addr=statistics.mode(reflexive) if reflexive else None,
        mapping_varies_by_dest=(len(ports) > 1) if len(reflexive) > 1 else None,
        region_latency_ms={k: round(v, 3) for k, v in sorted(region_ms.items())},
        relay_latency_ms={k: round(v, 3) for k, v in sorted(relay_ms.items())},
        preferred_region=preferred_region,
        preferred_relay=preferred_relay,
        duration_ms=round(duration_ms, 1),
        probes=probes,
    )
