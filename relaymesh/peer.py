"""open_peer(): the client SDK's top object.

It picks the closest relay (region/client.py), connects with a node key and
a disco key, and then, for every peer it talks to, tries to go direct:

- one UDP socket does everything: netcheck's STUN probes (so the reflexive
  address it learns is this socket's), disco Pings/Pongs, and direct data;
- the peer's disco key and endpoints come from the peer itself: an Intro
  through the relay, sealed node key to node key, answered with one (the
  relays' peer API is for operators only), then CallMeMaybe messages;
- relaymesh/paths.py decides, per peer, relay or direct;
- every payload is sealed end to end with the node keys, on both paths.

``peer.path(key)`` says how packets to ``key`` go now; ``peer.ping(key)``
measures a round trip on that path (every Peer answers disco Pings).

``send``, ``receive`` and ``ping`` may be called by many tasks at once. The
path state is a pure state machine changed only between awaits; waiters wait
on Events of their own (a ping its Pong, everyone learning a peer's disco
key the same never-replaced Event) or on the receive channel.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import httpx
import nacl.signing
import trio

from region.netcheck import NetcheckReport, StunProber
from relay.client import Packet, RelayClosedError
from relay.protocol import disco
from relay.protocol.disco import Addr, CallMeMaybe, DiscoCodec, DiscoError, Intro, Ping, Pong
from relay.protocol.keys import NodeKey, PrivateKey, Sealer, SealError
from relaymesh.home import HomeRelay, open_home_relay

from .paths import Action, PathConfig, PeerPath

__all__ = ["Peer", "PeerNotFound", "PeerPathInfo", "open_peer"]

log = logging.getLogger(__name__)


class PeerNotFound(Exception):
    """The node did not answer an Intro through the relay (not connected anywhere)."""


@dataclass(frozen=True, slots=True)
class PeerPathInfo:
    direct: bool
    addr: Addr | None
    rtt_ms: float | None
    region: str | None
    relay: str | None

    def describe(self) -> str:
        if self.direct and self.addr is not None:
            return f"direct via {self.addr[0]}:{self.addr[1]}"
        return f"via relay {self.relay}"


@dataclass(frozen=True, slots=True)
class Received:
    src: NodeKey
    payload: bytes
    direct: bool


def _parse_addr(text: str) -> Addr | None:
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


class Peer:
    def __init__(
        self,
        key: PrivateKey,
        sock: trio.socket.SocketType,
        *,
        path_config: PathConfig | None = None,
        direct: bool = True,
    ) -> None:
        self.key = key
        self.sealer = Sealer(key)
        self.disco = DiscoCodec(PrivateKey.generate())
        self.sock = sock
        self.prober = StunProber(sock)
        self.direct_enabled = direct
        self._cfg = path_config or PathConfig()
        self._paths: dict[NodeKey, PeerPath] = {}
        self._by_disco: dict[NodeKey, NodeKey] = {}
        self._pings: dict[bytes, tuple[trio.Event, list[float]]] = {}
        self._in_send, self._in_recv = trio.open_memory_channel[Received](4096)
        self._lookups: set[NodeKey] = set()
        # Set (never replaced) when a node's disco key is first known; many may wait on one.
        self._disco_known: dict[NodeKey, trio.Event] = {}
        self._intro_tries = 10
        self._intro_retry_s = 0.5
        # Intros answered, by node: at most one answer per _intro_retry_s / 2 each.
        self._intro_answered: dict[NodeKey, float] = {}
        self.home: HomeRelay | None = None
        self._nursery: trio.Nursery | None = None
        self.local_endpoints: list[str] = []

    @property
    def public_key(self) -> NodeKey:
        return self.key.public

    # ---- sending and receiving ---------------------------------------------

    def _path(self, node: NodeKey) -> PeerPath:
        path = self._paths.get(node)
        if path is None:
            path = self._paths[node] = PeerPath(node, self._cfg)
        return path

    async def send(self, dest: NodeKey, payload: bytes) -> None:
        sealed = self.sealer.seal(dest, payload)
        now = trio.current_time()
        path = self._path(dest)
        if self.direct_enabled:
            path.want_discovery(now)
            self._lookup(dest)
            addr = path.direct_addr(now)
            if addr is not None:
                try:
                    await self.sock.sendto(disco.encode_data(self.key.public, sealed), addr)
                except OSError:
                    pass
                else:
                    path.sent_direct(now)
                    return
        assert self.home is not None
        await self.home.client.send(dest, sealed)

    async def receive(self) -> Received:
        """The next packet for us. Raises RelayClosedError once the Peer is closed."""
        try:
            return await self._in_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise RelayClosedError("peer closed") from None

    def path(self, dest: NodeKey) -> PeerPathInfo:
        assert self.home is not None
        info = self._path(dest).info(trio.current_time())
        return PeerPathInfo(
            direct=info.direct,
            addr=info.addr,
            rtt_ms=info.rtt_ms,
            region=self.home.home.region,
            relay=self.home.home.relay,
        )

    async def ping(self, dest: NodeKey) -> tuple[float, PeerPathInfo]:
        """One disco round trip to ``dest`` on the path packets take now: (seconds, path)."""
        now = trio.current_time()
        path = self._path(dest)
        if path.disco_key is None:
            await self._introduce(dest)
            if path.disco_key is None:
                raise PeerNotFound(f"{dest} did not answer through the relay")
        if self.direct_enabled:
            path.want_discovery(now)
        info = self.path(dest)
        txid = disco.new_txid()
        done = trio.Event()
        result: list[float] = []
        self._pings[txid] = (done, result)
        try:
            start = trio.current_time()
            msg = Ping(txid, self.key.public)
            if info.direct and info.addr is not None and path.disco_key is not None:
                await self.sock.sendto(self.disco.seal(path.disco_key, msg), info.addr)
            else:
                await self._relay_disco(dest, msg)
            await done.wait()
            return trio.current_time() - start, info
        finally:
            self._pings.pop(txid, None)

    # ---- disco ------------------------------------------------------------------

    def _lookup(self, dest: NodeKey) -> None:
        """Learn the peer's disco key and endpoints (an Intro through the relay), once."""
        path = self._path(dest)
        if path.disco_key is not None or dest in self._lookups or self._nursery is None:
            return
        self._lookups.add(dest)
        self._nursery.start_soon(self._introduce, dest)

    def _learn_disco_key(self, node: NodeKey, disco_key: NodeKey, eps: list[Addr]) -> None:
        self._by_disco[disco_key] = node
        self._path(node).learn(disco_key, eps, trio.current_time())
        self._disco_known.setdefault(node, trio.Event()).set()

    async def _introduce(self, dest: NodeKey) -> None:
        """Send Intros asking for ``dest``'s, until one comes back or the tries run out."""
        known = self._disco_known.setdefault(dest, trio.Event())
        for _ in range(self._intro_tries):
            if known.is_set():
                return
            await self._send_intro(dest, reply=True)
            with trio.move_on_after(self._intro_retry_s):
                await known.wait()

    async def _send_intro(self, dest: NodeKey, *, reply: bool) -> None:
        assert self.home is not None
        eps = [a for e in self.endpoints() if (a := _parse_addr(e))]
        intro = Intro(self.disco.public, tuple(eps[: disco.MAX_INTRO_ENDPOINTS]), reply)
        sealed = self.sealer.seal(dest, disco.encode_intro(intro))
        await self.home.client.send(dest, disco.INTRO_MAGIC + sealed)

    async def _on_intro(self, src: NodeKey, data: bytes) -> None:
        """An Intro through the relay from ``src``: learn its disco key; answer if asked."""
        try:
            intro = disco.decode_intro(self.sealer.open(src, data[len(disco.INTRO_MAGIC) :]))
        except (SealError, DiscoError) as exc:
            log.debug("ignoring intro from %s: %s", src.short(), exc)
            return
        self._learn_disco_key(src, intro.disco_key, list(intro.endpoints))
        now = trio.current_time()
        if intro.reply and now - self._intro_answered.get(src, -1e9) >= self._intro_retry_s / 2:
            self._intro_answered[src] = now
            await self._send_intro(src, reply=False)

    async def _relay_disco(self, dest: NodeKey, msg: disco.Message) -> None:
        path = self._path(dest)
        if path.disco_key is None:
            return
        assert self.home is not None
        await self.home.client.send(dest, self.disco.seal(path.disco_key, msg))

    async def _act(self, path: PeerPath, actions: list[Action]) -> None:
        for action in actions:
            if path.disco_key is None:
                return
            if action.kind == "call_me_maybe":
                eps = [a for e in self.endpoints() if (a := _parse_addr(e))]
                await self._relay_disco(path.node, CallMeMaybe(tuple(eps)))
            elif action.addr is not None:
                log.debug("disco ping to %s for %s", action.addr, path.node.short())
                msg = Ping(action.txid, self.key.public)
                with suppress(OSError):
                    await self.sock.sendto(self.disco.seal(path.disco_key, msg), action.addr)

    def endpoints(self, report: NetcheckReport | None = None) -> list[str]:
        """Our candidates ("ip:port"): the LAN address, then the reflexive one from netcheck."""
        if not self.direct_enabled:
            return []
        if report is None and self.home is not None:
            report = self.home.report
        eps = list(self.local_endpoints)
        if report is not None and report.global_addr and report.global_addr not in eps:
            eps.append(report.global_addr)
        return eps

    async def _on_disco(
        self, data: bytes, *, src_addr: Addr | None, relay_src: NodeKey | None
    ) -> None:
        try:
            sender, msg = self.disco.open(data)
        except DiscoError as exc:
            log.debug("ignoring disco: %s", exc)
            return
        now = trio.current_time()
        log.debug(
            "disco %s from %s (%s)",
            type(msg).__name__,
            src_addr or "relay",
            relay_src.short() if relay_src else sender.short(),
        )
        match msg:
            case Ping(txid=txid, node_key=node):
                if relay_src is not None and relay_src != node:
                    return  # a Ping through the relay must come from the node it names
                self._learn_disco_key(node, sender, [])
                path = self._path(node)
                reply = self.disco.seal(sender, Pong(txid, src_addr or ("0.0.0.0", 0)))
                if src_addr is not None:
                    with suppress(OSError):
                        await self.sock.sendto(reply, src_addr)
                    if self.direct_enabled:
                        await self._act(path, path.ping_from_peer(src_addr, now))
                else:
                    assert self.home is not None
                    await self.home.client.send(node, reply)
            case Pong(txid=txid):
                waiter = self._pings.get(txid)
                if waiter is not None:
                    waiter[0].set()
                ponged = self._by_disco.get(sender)
                if ponged is not None and src_addr is not None:
                    self._path(ponged).on_pong(txid, now)
            case CallMeMaybe(endpoints=eps):
                if relay_src is None:
                    return  # only through the relay: it vouches for who sent it
                self._learn_disco_key(relay_src, sender, list(eps))
                path = self._path(relay_src)
                if self.direct_enabled:
                    await self._act(path, path.ping_candidates(now))

    # ---- the tasks ----------------------------------------------------------

    async def _udp_reader(self) -> None:
        while True:
            try:
                data, addr = await self.sock.recvfrom(65536)
            except OSError:
                await trio.sleep(0.01)
                continue
            if self.prober.feed(data):
                continue
            src: Addr = (addr[0], addr[1])
            if disco.is_disco(data):
                await self._on_disco(data, src_addr=src, relay_src=None)
            elif disco.is_data(data):
                try:
                    node, sealed = disco.decode_data(data)
                    payload = self.sealer.open(node, sealed)
                except (DiscoError, SealError):
                    continue
                await self._in_send.send(Received(node, payload, True))

    async def _relay_reader(self) -> None:
        assert self.home is not None
        while True:
            packet: Packet = await self.home.client.receive()
            if disco.is_disco(packet.payload):
                await self._on_disco(packet.payload, src_addr=None, relay_src=packet.src)
                continue
            if disco.is_intro(packet.payload):
                await self._on_intro(packet.src, packet.payload)
                continue
            try:
                payload = self.sealer.open(packet.src, packet.payload)
            except SealError:
                continue
            await self._in_send.send(Received(packet.src, payload, False))

    async def _maintain(self) -> None:
        while True:
            await trio.sleep(0.05)
            now = trio.current_time()
            for path in list(self._paths.values()):
                if self.direct_enabled:
                    await self._act(path, path.due(now))

    @property
    def dropped_by_relay(self) -> dict[str, int]:
        """Packets of ours the relay said it dropped (PacketsDropped), by reason."""
        assert self.home is not None
        return {code.name.lower(): n for code, n in self.home.client.dropped_by_relay.items()}

    def statistics(self) -> dict[str, Any]:
        return {
            str(node): {
                "direct": p.info(trio.current_time()).direct,
                "upgrades": p.upgrades,
                "fallbacks": p.fallbacks,
                "lost_in_cuts": p.lost_in_cuts,
            }
            for node, p in self._paths.items()
        }


def _local_address_towards(host: str) -> str | None:
    """The local address the kernel would use to reach ``host`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


@asynccontextmanager
async def open_peer(
    region_map_url: str,
    key: PrivateKey,
    *,
    verify_key: nacl.signing.VerifyKey | None = None,
    bind: tuple[str, int] = ("0.0.0.0", 0),
    direct: bool = True,
    path_config: PathConfig | None = None,
    **home_options: Any,
) -> AsyncIterator[Peer]:
    """A Peer on its closest relay, upgrading to direct paths where NATs allow."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(bind)
        port = sock.getsockname()[1]
        peer = Peer(key, sock, path_config=path_config, direct=direct)
        async with trio.open_nursery() as nursery:
            peer._nursery = nursery
            nursery.start_soon(peer._udp_reader)

            # The local address towards the map's host is our LAN candidate.
            host = httpx.URL(region_map_url).host
            local = _local_address_towards(host) if host else None
            if local and not local.startswith("127."):
                peer.local_endpoints = [f"{local}:{port}"]
            async with open_home_relay(
                region_map_url,
                key,
                verify_key=verify_key,
                prober=peer.prober,
                disco_key=peer.disco.public,
                endpoints_from=peer.endpoints,
                **home_options,
            ) as home:
                peer.home = home
                nursery.start_soon(peer._relay_reader)
                nursery.start_soon(peer._maintain)
                try:
                    yield peer
                finally:
                    nursery.cancel_scope.cancel()
                    # Tasks elsewhere blocked in receive() raise instead of waiting for ever.
                    peer._in_send.close()
