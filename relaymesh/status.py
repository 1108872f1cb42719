"""``relaymesh status``: the mesh's health document, fetched and put in a terminal.

The document is a relay's ``/api/v1/mesh`` (relay/health.py); this module only
reads it, decides the exit status and lays it out, problems first.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

import httpx

from relay.tls import describe_tls_error

__all__ = ["fetch_mesh_status", "render_status", "status_exit_code"]

#: Document layouts this client understands (relay/health.py DOC_VERSION).
_KNOWN_VERSIONS = {1}


def fetch_mesh_status(
    url: str, *, timeout_s: float = 5.0, ssl_context: ssl.SSLContext | None = None
) -> tuple[dict[str, Any] | None, str]:
    """The document, or None and a one-line reason (the relay is unreachable for us)."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        return None, "the status URL is a relay's HTTP URL (http://host:port)"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            resp = httpx.get(base + "/api/v1/mesh", timeout=timeout_s, verify=ssl_context or True)
        except httpx.TimeoutException:
            return None, f"no answer within {timeout_s:g} s"
        except httpx.HTTPError as exc:
            tls = describe_tls_error(exc)
            return None, tls or f"cannot reach the relay ({type(exc).__name__})"
        if resp.status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.5)  # the relay's monitor has not finished its first round yet
            continue
        if resp.status_code != 200:
            return None, f"HTTP {resp.status_code} from /api/v1/mesh: {resp.text.strip()[:200]}"
        try:
            doc = resp.json()
        except ValueError:
            return None, "/api/v1/mesh did not answer JSON (is this a relaymesh relay?)"
        if not isinstance(doc, dict) or doc.get("version") not in _KNOWN_VERSIONS:
            return None, "unknown status document version (a newer relay? upgrade relaymesh)"
        return doc, ""


def is_stale(doc: dict[str, Any]) -> bool:
    return bool(doc["served_at"] - doc["generated_at"] > doc["stale_after_s"])


def status_exit_code(doc: dict[str, Any]) -> int:
    return 0 if doc["healthy"] and not is_stale(doc) else 1


def _ago(doc: dict[str, Any], t: float | None) -> str:
    if t is None:
        return "-"
    s = max(0.0, doc["served_at"] - t)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s // 60:.0f}m{s % 60:02.0f}s"
    return f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m"


def _n(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_status(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    lines = []
    verdict = (
        "STALE" if is_stale(doc) else "healthy" if doc["healthy"] else f"{s['errors']} error(s)"
    )
    lines.append(
        f"mesh {verdict}, {s['warnings']} warning(s) · relays up {s['relays_up']}/{s['relays']}"
        + (f" ({s['relays_left']} left as planned)" if s.get("relays_left") else "")
        + f" · paths up {s['links_up']}/{s['links']} · served by {doc['served_by']},"
        f" collected {_ago(doc, doc['generated_at'])} ago"
    )
    if is_stale(doc):
        lines.append(
            f"  the relay has not refreshed this status for {_ago(doc, doc['generated_at'])}:"
            " figures below may be wrong"
        )
    lines.append("")
    lines.append("PROBLEMS" if doc["problems"] else "PROBLEMS  none")
    for p in doc["problems"]:
        lines.append(
            f"  {p['severity']:<8}{p['code']:<22}{p['subject']:<20}"
            f"{_ago(doc, p['since']):>7}  {p['message']}"
        )
    lines.append("")
    lines.append(
        f"  {'RELAY':<14}{'REGION':<10}{'STATE':<10}{'SINCE':>7}{'CLIENTS':>9}"
        f"{'PKT/S IN':>10}{'OUT':>8}{'DROPS/S':>9}{'PROBE MS':>10}"
    )
    for r in doc["relays"]:
        probe = r["probe"]
        rtt = _n(probe["rtt_ms"], 1) if probe and probe["ok"] else ("FAIL" if probe else "-")
        lines.append(
            f"  {r['relay_id']:<14}{r['region']:<10}{r['state']:<10}{_ago(doc, r['since']):>7}"
            f"{_n(r['clients']):>9}{_n(r['pps_in']):>10}{_n(r['pps_out']):>8}"
            f"{_n(r['drops_per_s'], 1):>9}{rtt:>10}"
        )
    # Paths that are not up, or that lose packets on their mesh link.
    down = [
        link for link in doc["links"] if link["state"] != "up" or (link.get("drops_per_s") or 0) > 0
    ]
    rtts = sorted(link["rtt_ms"] for link in doc["links"] if link["rtt_ms"] is not None)
    median = f", median round trip {rtts[len(rtts) // 2]:.1f} ms" if rtts else ""
    lines.append("")
    lines.append(f"PATHS  {s['links_up']}/{s['links']} up{median}")
    if down:
        lines.append(f"  {'PATH':<30}{'STATE':<9}{'SINCE':>7}{'PKT/S':>9}{'DROPS/S':>9}")
    for link in down:
        lines.append(
            f"  {link['src'] + ' → ' + link['dst']:<30}{link['state']:<9}"
            f"{_ago(doc, link['since']):>7}{_n(link.get('pps')):>9}"
            f"{_n(link.get('drops_per_s'), 1):>9}  {link['probe_error'] or ''}"
        )
    e = doc["etcd"]
    lag = {k: v for k, v in e["revision_lag"].items() if v}
    lines.append("")
    lines.append(
        f"ETCD  reachable {_yes(e['reachable'])} · lease held {_yes(e['lease_held'])}"
        f" · in sync {_yes(e['synced'])} · revision {_n(e['revision'])}"
        + (f" · behind: {lag}" if lag else "")
    )
    if doc["events"]:
        lines.append("")
        lines.append("RECENT EVENTS")
        for ev in doc["events"][:8]:
            level = ev.get("level", "info")
            lines.append(f"  {_ago(doc, ev['at']):>7} ago  {level:<8}{ev['message']}")
    return "\n".join(lines)


def _yes(v: bool | None) -> str:
    return "-" if v is None else "yes" if v else "NO"
