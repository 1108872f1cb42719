"""Mesh health, sans-IO: observations in, a status document and a problem list out.

:class:`MeshHealth` is fed, once per collection round, with what the monitor
(relay/monitor.py) saw: the registry's relay records and, per relay, either
its ``/api/v1/status`` document or why it could not be fetched. From those it
builds the document served at ``/api/v1/mesh`` and shown by ``/dashboard``
and ``relaymesh status``: relays and their state since when, regions, the
directed link matrix with the probes' round trips, etcd health, problems
with stable codes (docs/health.md), a short event log and ~15 minutes of
history for the charts.

Failovers come from the peer map, when the caller passes it (``homes``: each
client key and the relay it is published under): a key whose relay changed
since the last round moved, and each round's moves become one ``failover``
event per pair of relays, with the reason the old relay gave (draining, down).

It never reads a clock or a socket: every call takes ``now``. State kept
between rounds is what turns counters into rates, remembers since when
something has been as it is, and remembers relays that left the registry (a
relay that died is down, not forgotten, for ``forget_after_s``).

A relay that stops as planned is not a failure: it announces the stop (its
registry record gets ``leaving_at``, and its status says ``draining``), then
deregisters. One that left after such an announcement (seen in its record,
its state, or in the ``departed`` relays the caller passes, for an
announcement that fell between two rounds) is ``left``: an info event, no
problem, and no longer in the path matrix. A relay that vanished without
one is ``down``. Either way a region left with no relay up is a problem.

Stale data is never shown as healthy: a relay whose last good status is older
than ``stale_after_s`` is ``down``; one whose latest fetch failed but whose
last good status is recent is ``stale`` (a warning), and its figures are
marked so.
"""

from __future__ import annotations

import statistics
from collections import Counter, deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.registry import RelayRecord

__all__ = [
    "ERROR",
    "INFO",
    "PROBLEM_CODES",
    "WARNING",
    "Fetch",
    "HealthThresholds",
    "MeshHealth",
    "Problem",
]

ERROR = "error"
WARNING = "warning"
#: Events only: something changed and nothing is wrong.
INFO = "info"

#: Every problem code and its severity; docs/health.md says what each means and what to do.
PROBLEM_CODES: dict[str, str] = {
    "relay_down": ERROR,
    "relay_stale": WARNING,
    "relay_draining": WARNING,
    "mesh_link_down": ERROR,
    "probe_failed": ERROR,
    "etcd_unreachable": ERROR,
    "state_not_synced": WARNING,
    "drops_high": WARNING,
    "region_without_relay": ERROR,
}

#: The version of the document's layout; a client refuses one it does not know.
DOC_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthThresholds:
    #: Collection period; rates are per second over it.
    interval_s: float = 5.0
    #: A relay status older than this is no longer shown: the relay is down.
    stale_after_s: float = 15.0
    #: Consecutive failed probes before a path is reported.
    probe_failures: int = 2
    #: Dropped packets per second on one relay above which it is reported.
    drops_high_per_s: float = 100.0
    #: How long a relay that left the registry is still shown (as down, or as left).
    forget_after_s: float = 600.0
    #: History kept for the charts.
    history_s: float = 900.0
    events: int = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetch:
    """One attempt to read a relay's status: the document, or why there is none."""

    doc: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    code: str
    severity: str
    subject: str
    since: float
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Relay:
    """What is remembered of one relay between rounds."""

    relay_id: str
    region: str
    record: dict[str, Any]
    state: str = "down"
    since: float = 0.0
    doc: dict[str, Any] | None = None
    doc_at: float | None = None
    error: str | None = None
    in_registry: bool = True
    left_at: float | None = None
    #: It left the registry after announcing a planned stop.
    planned: bool = False
    ever_up: bool = False
    rated: bool = False
    # Counters at the previous good fetch, for rates.
    prev: tuple[float, int, int, int] | None = None
    pps_in: float = 0.0
    pps_out: float = 0.0
    drops_per_s: float = 0.0
    # Per mesh link: (time, packets sent, drops) at the previous good fetch, and rates.
    links_prev: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    links_pps: dict[str, float] = field(default_factory=dict)
    links_dps: dict[str, float] = field(default_factory=dict)


class MeshHealth:
    """The mesh as one relay sees it, round after round."""

    def __init__(
        self,
        served_by: str,
        thresholds: HealthThresholds | None = None,
        *,
        regions: Iterable[str] = (),
    ) -> None:
        self.served_by = served_by
        self.t = thresholds or HealthThresholds()
        self._relays: dict[str, _Relay] = {}
        #: Regions that must have a relay: those of the region map, and every region seen.
        self._regions: set[str] = set(regions)
        self._since: dict[tuple[str, str], float] = {}
        self._link_state: dict[tuple[str, str], str] = {}
        self._announced: set[tuple[str, str]] = set()
        self._etcd_ok: dict[str, bool] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=self.t.events)
        points = max(2, int(self.t.history_s / self.t.interval_s) + 1)
        self.history: deque[tuple[float, *tuple[float | None, ...]]] = deque(maxlen=points)
        self.doc: dict[str, Any] | None = None
        #: The relay each client key was last published under, and when it was last seen.
        self._homes: dict[bytes, tuple[str, float]] = {}

    # ---- one round ------------------------------------------------------------

    def update(
        self,
        now: float,
        registry: Iterable[RelayRecord],
        fetches: Mapping[str, Fetch],
        homes: Iterable[tuple[bytes, str]] | None = None,
        departed: Collection[str] = (),
    ) -> dict[str, Any]:
        """Fold in one round of observations; the new document.

        ``homes``: every client key of the peer map and the relay it is (or, lost,
        was last) published under; without it there are no failover events.
        ``departed``: relays known to have left the registry after announcing a
        planned stop (coordinator.state.MeshState.departed).
        """
        self._fold_registry(now, registry, departed)
        for relay in self._relays.values():
            self._fold_fetch(now, relay, fetches.get(relay.relay_id))
        if homes is not None:
            self._fold_homes(now, homes)
        for rid in [
            rid
            for rid, r in self._relays.items()
            if r.left_at is not None and now - r.left_at > self.t.forget_after_s
        ]:
            del self._relays[rid]
        links = self._links(now)
        relays = [self._relay_json(now, r) for r in sorted(self._relays.values(), key=_order)]
        etcd = self._etcd(now)
        problems = self._problems(now, links, etcd)
        self._record_history(now, links)
        errors = sum(1 for p in problems if p.severity == ERROR)
        self.doc = {
            "version": DOC_VERSION,
            "generated_at": now,
            "served_by": self.served_by,
            "interval_s": self.t.interval_s,
            "stale_after_s": self.t.stale_after_s,
            "healthy": errors == 0,
            "summary": {
                # Relays that left as planned are listed, not counted.
                "relays": sum(1 for r in relays if r["state"] != "left"),
                "relays_up": sum(1 for r in relays if r["state"] == "up"),
                "relays_left": sum(1 for r in relays if r["state"] == "left"),
                "regions": len(self._regions),
                "links": len(links),
                "links_up": sum(1 for link in links if link["state"] == "up"),
                "errors": errors,
                "warnings": len(problems) - errors,
            },
            "problems": [p.to_json() for p in problems],
            "regions": self._regions_json(),
            "relays": relays,
            "links": links,
            "etcd": etcd,
            "events": list(reversed(self.events)),
            "history": self._history_json(),
        }
        return self.doc

    # ---- relays ---------------------------------------------------------------

    def _fold_registry(
        self, now: float, registry: Iterable[RelayRecord], departed: Collection[str]
    ) -> None:
        present = set()
        for rec in registry:
            present.add(rec.relay_id)
            self._regions.add(rec.region)
            relay = self._relays.get(rec.relay_id)
            if relay is None:
                relay = self._relays[rec.relay_id] = _Relay(
                    rec.relay_id, rec.region, asdict(rec), since=now
                )
                self._event(now, "relay_joined", rec.relay_id, f"{rec.relay_id} joined the mesh")
            elif not relay.in_registry:
                self._event(now, "relay_joined", rec.relay_id, f"{rec.relay_id} is back")
            elif relay.record.get("started_at") != rec.started_at:
                self._event(now, "relay_restarted", rec.relay_id, f"{rec.relay_id} restarted")
            if relay.record.get("started_at") != rec.started_at:
                relay.prev = None
                relay.rated = False
                relay.links_prev.clear()
            relay.record = asdict(rec)
            relay.region = rec.region
            relay.in_registry = True
            relay.left_at = None
            relay.planned = False
        for relay in self._relays.values():
            if relay.relay_id not in present and relay.in_registry:
                relay.in_registry = False
                relay.left_at = now
                relay.planned = relay.state != "down" and (
                    relay.record.get("leaving_at") is not None
                    or relay.relay_id in departed
                    or relay.state == "draining"
                )
                if relay.planned:
                    self._event(
                        now,
                        "relay_left",
                        relay.relay_id,
                        f"{relay.relay_id}: relay left (planned)",
                    )
                else:
                    self._event(
                        now,
                        "relay_left",
                        relay.relay_id,
                        f"{relay.relay_id} left the registry unannounced",
                        WARNING,
                    )

    def _fold_fetch(self, now: float, relay: _Relay, fetch: Fetch | None) -> None:
        if fetch is not None and fetch.doc is not None and relay.in_registry:
            doc = fetch.doc
            stats = doc.get("stats", {})
            counters = (
                now,
                int(stats.get("packets_in", 0)),
                int(stats.get("packets_out", 0)),
                sum(int(n) for n in stats.get("drops", {}).values()),
            )
            if relay.prev is not None and now > relay.prev[0]:
                dt = now - relay.prev[0]
                relay.pps_in = max(0, counters[1] - relay.prev[1]) / dt
                relay.pps_out = max(0, counters[2] - relay.prev[2]) / dt
                relay.drops_per_s = max(0, counters[3] - relay.prev[3]) / dt
                relay.rated = True
            relay.prev = counters
            for link in doc.get("mesh_links", []):
                dst, sent = str(link.get("relay_id")), int(link.get("packets_sent", 0))
                drops = int(link.get("drops", 0))
                before = relay.links_prev.get(dst)
                if before is not None and now > before[0]:
                    dt = now - before[0]
                    relay.links_pps[dst] = max(0, sent - before[1]) / dt
                    relay.links_dps[dst] = max(0, drops - before[2]) / dt
                relay.links_prev[dst] = (now, sent, drops)
            relay.doc, relay.doc_at, relay.error = doc, now, None
        elif fetch is not None:
            relay.error = fetch.error or "no status"
        elif not relay.in_registry:
            relay.error = None if relay.planned else "not in the registry"
        leaving = relay.in_registry and relay.record.get("leaving_at") is not None
        if not relay.in_registry and relay.planned:
            state = "left"
        elif (
            not relay.in_registry
            or relay.doc_at is None
            or now - relay.doc_at > self.t.stale_after_s
        ):
            state = "down"
        elif leaving or (relay.doc is not None and relay.doc.get("draining")):
            # A relay on its way out may stop answering before it deregisters.
            state = "draining"
        elif relay.doc_at < now:
            state = "stale"
        else:
            state = "up"
        if state != relay.state:
            if state == "down" or (relay.state == "down" and relay.ever_up):
                kind = "relay_down" if state == "down" else "relay_up"
                level = ERROR if state == "down" else INFO
                self._event(now, kind, relay.relay_id, self._why(relay, state), level)
            relay.state = state
            relay.since = now
        if state != "down":
            relay.ever_up = True
        if state in ("down", "left"):
            relay.pps_in = relay.pps_out = relay.drops_per_s = 0.0
            relay.links_pps.clear()
            relay.links_dps.clear()

    def _fold_homes(self, now: float, homes: Iterable[tuple[bytes, str]]) -> None:
        """Clients whose relay changed since the last round: one event per pair of relays.

        A key gone from the peer map is remembered for ``forget_after_s``, so a
        client that comes back on a sibling after a while still counts as moved.
        """
        moves: Counter[tuple[str, str]] = Counter()
        known = self._homes
        for key, relay_id in homes:
            before = known.get(key)
            if before is not None and before[0] != relay_id:
                moves[(before[0], relay_id)] += 1
            known[key] = (relay_id, now)
        for key in [k for k, (_, seen) in known.items() if now - seen > self.t.forget_after_s]:
            del known[key]
        for (src, dst), n in sorted(moves.items()):
            old = self._relays.get(src)
            why = f" ({src} is {old.state})" if old is not None and old.state != "up" else ""
            if old is not None and old.state == "left":
                why = f" ({src} left)"
            clients = "1 client" if n == 1 else f"{n} clients"
            self._event(
                now, "failover", f"{src}>{dst}", f"{clients} moved from {src} to {dst}{why}"
            )

    @staticmethod
    def _why(relay: _Relay, state: str) -> str:
        if state == "up":
            return f"{relay.relay_id} is up"
        return f"{relay.relay_id} is down: {relay.error or 'no status'}"

    def _relay_json(self, now: float, r: _Relay) -> dict[str, Any]:
        fresh = r.state in ("up", "draining", "stale")
        doc = r.doc if fresh else None
        stats = (doc or {}).get("stats", {})
        shared = (doc or {}).get("shared_state") or {}
        return {
            "relay_id": r.relay_id,
            "region": r.region,
            "state": r.state,
            "since": r.since,
            "stale": r.state == "stale"
            or (r.state == "draining" and r.doc_at is not None and r.doc_at < now),
            "updated_at": r.doc_at,
            "error": r.error if r.state != "up" else None,
            "version": r.record.get("version"),
            "started_at": r.record.get("started_at"),
            "ws_url": r.record.get("ws_url"),
            "http_url": r.record.get("http_url"),
            "clients": stats.get("clients") if doc else None,
            "pps_in": round(r.pps_in, 2) if doc else None,
            "pps_out": round(r.pps_out, 2) if doc else None,
            "drops": stats.get("drops", {}) if doc else {},
            "drops_per_s": round(r.drops_per_s, 2) if doc else None,
            "rate_limited_s": stats.get("rate_limited_s") if doc else None,
            "queued": (doc or {}).get("queues", {}).get("data_queued") if doc else None,
            "queue_max": (doc or {}).get("queues", {}).get("data_queued_max") if doc else None,
            "etcd": {
                "reachable": shared.get("degraded") is None if doc else None,
                "lease_held": shared.get("registered") if doc else None,
                "synced": shared.get("synced") if doc else None,
                "revision": shared.get("revision") if doc else None,
                "degraded": shared.get("degraded") if doc else None,
            },
            "probe": self._self_probe(r) if doc else None,
        }

    @staticmethod
    def _self_probe(r: _Relay) -> dict[str, Any] | None:
        for p in (r.doc or {}).get("probes", []):
            if p.get("dst") == r.relay_id:
                return dict(p)
        return None

    # ---- links ------------------------------------------------------------------

    def _links(self, now: float) -> list[dict[str, Any]]:
        """Every directed pair of known relays (but those that left as planned): link
        state, throughput, the probe's view."""
        out = []
        relays = sorted((r for r in self._relays.values() if r.state != "left"), key=_order)
        for src in relays:
            src_doc = src.doc if src.state in ("up", "draining", "stale") else None
            links = {str(x.get("relay_id")): x for x in (src_doc or {}).get("mesh_links", [])}
            probes = {str(p.get("dst")): p for p in (src_doc or {}).get("probes", [])}
            for dst in relays:
                if dst is src:
                    continue
                link = links.get(dst.relay_id)
                probe = probes.get(dst.relay_id)
                state = self._path_state(src_doc is not None, dst.state, link, probe)
                if src.state == "stale" and state == "up":
                    state = "unknown"
                key = (src.relay_id, dst.relay_id)
                before = self._link_state.get(key)
                if before != state:
                    self._since[("link", f"{key[0]}>{key[1]}")] = now
                    self._link_event(now, key, state, "down" not in (src.state, dst.state))
                    self._link_state[key] = state
                out.append(
                    {
                        "src": src.relay_id,
                        "dst": dst.relay_id,
                        "state": state,
                        "since": self._since[("link", f"{key[0]}>{key[1]}")],
                        "connected": bool(link.get("connected")) if link else None,
                        "pps": round(src.links_pps.get(dst.relay_id, 0.0), 2) if link else None,
                        "drops_per_s": round(src.links_dps.get(dst.relay_id, 0.0), 2)
                        if link
                        else None,
                        "drops": int(link.get("drops", 0)) if link else None,
                        "queued": link.get("queued") if link else None,
                        "rtt_ms": probe.get("rtt_ms") if probe and probe.get("ok") else None,
                        "probe_ok": probe.get("ok") if probe else None,
                        "probe_failures": probe.get("failures", 0) if probe else None,
                        "probe_error": probe.get("error") if probe else None,
                    }
                )
        known = {(s.relay_id, d.relay_id) for s in relays for d in relays}
        for key in [k for k in self._link_state if k not in known]:
            del self._link_state[key]
            self._announced.discard(key)
        return out

    def _link_event(self, now: float, key: tuple[str, str], state: str, ends_up: bool) -> None:
        """A path going down while both its relays are up, and its coming back.

        A down relay's paths go down with it; its own event says so.
        """
        subject = f"{key[0]}>{key[1]}"
        if state == "down" and ends_up:
            self._announced.add(key)
            self._event(now, "link_down", subject, f"path {key[0]} → {key[1]} down", ERROR)
        elif state == "up" and key in self._announced:
            self._announced.discard(key)
            self._event(now, "link_up", subject, f"path {key[0]} → {key[1]} up again")

    def _path_state(
        self,
        src_known: bool,
        dst_state: str,
        link: dict[str, Any] | None,
        probe: dict[str, Any] | None,
    ) -> str:
        """up, down or unknown: what the probe proved, else what the mesh link says."""
        if not src_known or dst_state == "down":
            return "down"
        if probe is not None and probe.get("failures", 0) >= self.t.probe_failures:
            return "down"
        if link is not None and not link.get("connected"):
            return "down"
        if (probe is not None and probe.get("ok")) or (link is not None and link.get("connected")):
            return "up"
        return "unknown"

    # ---- etcd -----------------------------------------------------------------

    def _etcd(self, now: float) -> dict[str, Any]:
        revisions = {
            r.relay_id: int((r.doc or {}).get("shared_state", {}).get("revision") or 0)
            for r in self._relays.values()
            if r.state in ("up", "draining") and (r.doc or {}).get("shared_state")
        }
        top = max(revisions.values(), default=0)
        unreachable = []
        for r in self._relays.values():
            shared = (r.doc or {}).get("shared_state") if r.state in ("up", "draining") else None
            if not shared:
                continue
            ok = shared.get("degraded") is None
            before = self._etcd_ok.get(r.relay_id)
            if before is not None and before != ok:  # a relay still registering has lost nothing
                self._event(
                    now,
                    "etcd_back" if ok else "etcd_lost",
                    r.relay_id,
                    f"{r.relay_id}: shared state "
                    + ("reachable again" if ok else f"lost: {shared.get('degraded')}"),
                    INFO if ok else ERROR,
                )
            self._etcd_ok[r.relay_id] = ok
            if not ok:
                unreachable.append(r.relay_id)
        me = self._relays.get(self.served_by)
        shared = (me.doc or {}).get("shared_state") if me is not None and me.doc else None
        return {
            "reachable": (shared.get("degraded") is None) if shared else None,
            "lease_held": shared.get("registered") if shared else None,
            "synced": shared.get("synced") if shared else None,
            "revision": shared.get("revision") if shared else None,
            "top_revision": top,
            "revision_lag": {rid: top - rev for rid, rev in sorted(revisions.items())},
            "unreachable_from": sorted(unreachable),
        }

    # ---- problems ---------------------------------------------------------------

    def _problems(
        self, now: float, links: list[dict[str, Any]], etcd: dict[str, Any]
    ) -> list[Problem]:
        found: list[tuple[str, str, str]] = []
        for r in sorted(self._relays.values(), key=_order):
            if r.state == "down":
                found.append(("relay_down", r.relay_id, self._why(r, "down")))
            elif r.state == "stale":
                age = now - (r.doc_at or now)
                found.append(
                    (
                        "relay_stale",
                        r.relay_id,
                        f"{r.relay_id}: status not refreshed for {age:.0f} s ({r.error})",
                    )
                )
            elif r.state == "draining":
                found.append(("relay_draining", r.relay_id, f"{r.relay_id} is draining"))
            if r.state in ("up", "draining"):
                shared = (r.doc or {}).get("shared_state") or {}
                if shared and shared.get("degraded") is not None:
                    found.append(
                        ("etcd_unreachable", r.relay_id, f"{r.relay_id}: {shared['degraded']}")
                    )
                elif shared and not shared.get("synced"):
                    found.append(
                        ("state_not_synced", r.relay_id, f"{r.relay_id}: peer map not in sync")
                    )
                if r.drops_per_s > self.t.drops_high_per_s:
                    found.append(
                        (
                            "drops_high",
                            r.relay_id,
                            f"{r.relay_id} drops {r.drops_per_s:.0f} packets/s",
                        )
                    )
        states = {r.relay_id: r.state for r in self._relays.values()}
        for link in links:
            if link["state"] != "down":
                continue
            if states.get(link["src"]) != "up" or states.get(link["dst"]) != "up":
                continue  # the relay's own problem says it all
            subject = f"{link['src']}>{link['dst']}"
            if link["connected"] is False:
                found.append(
                    ("mesh_link_down", subject, f"mesh link {link['src']} → {link['dst']} is down")
                )
            else:
                found.append(
                    (
                        "probe_failed",
                        subject,
                        f"packets from {link['src']} do not reach {link['dst']}"
                        f" ({link['probe_failures']} probes failed: {link['probe_error']})",
                    )
                )
        for r in self._relays.values():
            probe = self._self_probe(r) if r.state == "up" else None
            if probe is not None and probe.get("failures", 0) >= self.t.probe_failures:
                found.append(
                    (
                        "probe_failed",
                        f"{r.relay_id}>{r.relay_id}",
                        f"{r.relay_id} does not deliver packets between two of its clients"
                        f" ({probe['failures']} probes failed: {probe.get('error')})",
                    )
                )
        up_regions = {r.region for r in self._relays.values() if r.state not in ("down", "left")}
        for region in sorted(self._regions - up_regions):
            found.append(("region_without_relay", region, f"region {region} has no relay up"))
        problems = []
        active = set()
        for code, subject, message in found:
            key = (code, subject)
            active.add(key)
            since = self._since.setdefault(key, now)
            problems.append(
                Problem(
                    code=code,
                    severity=PROBLEM_CODES[code],
                    subject=subject,
                    since=since,
                    message=message,
                )
            )
        for key in [k for k in self._since if k[0] != "link" and k not in active]:
            del self._since[key]
        order = list(PROBLEM_CODES)
        problems.sort(key=lambda p: (p.severity != ERROR, order.index(p.code), p.since, p.subject))
        return problems

    # ---- regions, history, events ----------------------------------------------

    def _regions_json(self) -> list[dict[str, Any]]:
        out = []
        for region in sorted(self._regions):
            members = sorted((r for r in self._relays.values() if r.region == region), key=_order)
            out.append(
                {
                    "region": region,
                    "relays": [r.relay_id for r in members],
                    "up": sum(1 for r in members if r.state in ("up", "draining")),
                    "left": sum(1 for r in members if r.state == "left"),
                }
            )
        return out

    def _record_history(self, now: float, links: list[dict[str, Any]]) -> None:
        # A relay's rates exist from its second status on; before any has one, there is no point.
        live = [r for r in self._relays.values() if r.state == "up" and r.rated]
        rtts = [link["rtt_ms"] for link in links if link["rtt_ms"] is not None]
        self.history.append(
            (
                now,
                sum(r.pps_in for r in live) if live else None,
                sum(r.pps_out for r in live) if live else None,
                sum(r.drops_per_s for r in live) if live else None,
                statistics.median(rtts) if rtts else None,
            )
        )

    def _history_json(self) -> dict[str, list[Any]]:
        cols: dict[str, list[Any]] = {
            "t": [],
            "pps_in": [],
            "pps_out": [],
            "drops_per_s": [],
            "rtt_ms": [],
        }
        for t, *values in self.history:
            cols["t"].append(round(t, 3))
            for name, v in zip(("pps_in", "pps_out", "drops_per_s", "rtt_ms"), values, strict=True):
                cols[name].append(None if v is None else round(v, 3))
        return cols

    def _event(self, now: float, kind: str, subject: str, message: str, level: str = INFO) -> None:
        self.events.append(
            {"at": now, "kind": kind, "level": level, "subject": subject, "message": message}
        )


def _order(r: _Relay) -> tuple[str, str]:
    return (r.region, r.relay_id)
