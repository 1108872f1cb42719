"""Connect to the closest relay, and stay there unless another is clearly better.

``open_home_relay(map_url, key)`` fetches the region map, runs netcheck,
picks the home relay (region/select.py) and connects a RelayClient whose URL
list is: home relay, the other relays of the home region, then the other
regions from fastest to slowest, so that failover goes next door first. In the
background it refreshes the map and re-runs netcheck every
``netcheck_interval_s``; when the selector moves home, the client moves.

A failed map fetch keeps the last good map (headscale#2694): a client never
drops a working relay because the map could not be fetched. With
``verify_key`` a map whose signature does not verify is refused like a failed
fetch.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import nacl.signing
import trio

from region.live import SIGNATURE_HEADER, verify
from region.model import RegionMap, RegionMapError, parse_region_map
from region.netcheck import NetcheckReport, StunProber, run_netcheck
from region.select import HomeChoice, HomeSelector
from relay.client import RelayClient
from relay.protocol.keys import PrivateKey
from relay.tls import client_context, describe_tls_error

__all__ = ["HomeRelay", "MapFetchError", "RegionMapSource", "open_home_relay", "relay_order"]

log = logging.getLogger(__name__)


class MapFetchError(Exception):
    """The region map could not be fetched, parsed or verified."""


class RegionMapSource:
    """Fetches the map with If-None-Match; keeps the last good one when a fetch fails."""

    def __init__(
        self,
        url: str,
        *,
        verify_key: nacl.signing.VerifyKey | None = None,
        timeout_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url.rstrip("/") + (
            "" if url.rstrip("/").endswith("/regionmap") else "/regionmap"
        )
        self.verify_key = verify_key
        self.timeout_s = timeout_s
        #: What an https:// relay is verified with (None: the system's store).
        self.ssl_context = ssl_context if ssl_context is not None else client_context()
        self.current: RegionMap | None = None
        self.last_error: str | None = None
        self._etag: str | None = None

    async def fetch(self) -> RegionMap:
        """The current map; raises MapFetchError only if there has never been a good one."""
        try:
            self.current = await self._fetch()
            self.last_error = None
        except MapFetchError as exc:
            self.last_error = str(exc)
            if self.current is None:
                raise
            log.warning("keeping the last good region map: %s", exc)
        return self.current

    async def _fetch(self) -> RegionMap:
        headers = {"If-None-Match": self._etag} if self._etag and self.current else {}
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, verify=self.ssl_context) as client:
                resp = await client.get(self.url, headers=headers)
        except httpx.HTTPError as exc:
            raise MapFetchError(f"{self.url}: {describe_tls_error(exc) or exc}") from None
        if resp.status_code == 304 and self.current is not None:
            return self.current
        if resp.status_code != 200:
            raise MapFetchError(f"{self.url}: HTTP {resp.status_code}")
        if self.verify_key is not None and not verify(
            resp.content, resp.headers.get(SIGNATURE_HEADER), self.verify_key
        ):
            raise MapFetchError(f"{self.url}: the region map's signature does not verify")
        try:
            region_map = parse_region_map(resp.json(), source=self.url)
        except (RegionMapError, ValueError) as exc:
            raise MapFetchError(str(exc)) from None
        self._etag = resp.headers.get("ETag")
        return region_map


def relay_order(region_map: RegionMap, report: NetcheckReport, home: HomeChoice) -> list[str]:
    """WebSocket URLs: home relay, its region's others, then other regions by latency."""

    def node_ms(name: str) -> float:
        return report.relay_latency_ms.get(name, float("inf"))

    def region_ms(code: str) -> float:
        return report.region_latency_ms.get(code, float("inf"))

    regions = sorted(
        region_map.regions, key=lambda r: (r.code != home.region, region_ms(r.code), r.id)
    )
    urls: list[str] = []
    for region in regions:
        nodes = sorted(
            (n for n in region.nodes if n.up),
            key=lambda n: (n.name != home.relay, node_ms(n.name), n.name),
        )
        urls.extend(n.ws_url for n in nodes)
    return urls


@dataclass
class HomeRelay:
    client: RelayClient
    source: RegionMapSource
    selector: HomeSelector
    report: NetcheckReport
    home: HomeChoice
    history: list[HomeChoice] = field(default_factory=list)

    @property
    def region_map(self) -> RegionMap:
        assert self.source.current is not None
        return self.source.current


def _observe(selector: HomeSelector, region_map: RegionMap, report: NetcheckReport) -> None:
    selector.observe(
        trio.current_time(),
        report.region_latency_ms,
        report.relay_latency_ms,
        {n.name: r.code for r in region_map.regions for n in r.nodes},
    )


def _up(region_map: RegionMap) -> set[str]:
    return {n.name for r in region_map.regions for n in r.nodes if n.up}


@asynccontextmanager
async def open_home_relay(
    map_url: str,
    key: PrivateKey,
    *,
    verify_key: nacl.signing.VerifyKey | None = None,
    netcheck_interval_s: float = 30.0,
    netcheck_deadline_s: float = 3.0,
    selector: HomeSelector | None = None,
    prober: StunProber | None = None,
    endpoints_from: Callable[[NetcheckReport], Sequence[str]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    **client_options: Any,
) -> AsyncIterator[HomeRelay]:
    """``prober``: netcheck from this (the caller's UDP socket, fed by the caller).
    ``endpoints_from``: the endpoint candidates to announce, given a netcheck report.
    ``ssl_context``: what wss:// and https:// relays are verified with (None: the
    system's trust store, or ``SSL_CERT_FILE``); see :func:`relay.tls.client_context`.
    """
    ssl_context = ssl_context if ssl_context is not None else client_context()
    source = RegionMapSource(map_url, verify_key=verify_key, ssl_context=ssl_context)
    region_map = await source.fetch()
    report = await run_netcheck(
        region_map, prober=prober, deadline_s=netcheck_deadline_s, ssl_context=ssl_context
    )
    selector = selector or HomeSelector()
    _observe(selector, region_map, report)
    home = selector.choose(trio.current_time(), relays_up=_up(region_map))
    if home is None:
        raise MapFetchError("no relay of the region map answered a probe")
    if endpoints_from is not None:
        client_options["endpoints"] = tuple(endpoints_from(report))
    client = RelayClient(
        relay_order(region_map, report, home),
        key,
        preferred=True,
        ssl_context=ssl_context,
        **client_options,
    )
    state = HomeRelay(client, source, selector, report, home, [home])
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)

        async def recheck() -> None:
            while True:
                await trio.sleep(netcheck_interval_s)
                current_map = await source.fetch()
                state.report = await run_netcheck(
                    current_map,
                    prober=prober,
                    stun_probes=1,
                    deadline_s=netcheck_deadline_s,
                    ssl_context=ssl_context,
                )
                _observe(selector, current_map, state.report)
                if endpoints_from is not None:
                    client.endpoints = tuple(endpoints_from(state.report))
                choice = selector.choose(
                    trio.current_time(), home_alive=client.connected, relays_up=_up(current_map)
                )
                if choice is None:
                    continue
                state.home = choice
                if choice.changed:
                    state.history.append(choice)
                    log.info("home relay → %s/%s (%s)", choice.region, choice.relay, choice.reason)
                    client.move_to(relay_order(current_map, state.report, choice))
                else:
                    # Keep the failover order current without moving.
                    client.urls = relay_order(current_map, state.report, choice)

        nursery.start_soon(recheck)
        try:
            yield state
        finally:
            nursery.cancel_scope.cancel()
