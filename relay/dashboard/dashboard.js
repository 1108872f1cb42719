// The mesh health page: polls /api/v1/mesh (a cached document, cheap to serve)
// and redraws. No framework, no network beyond this relay: operators run it offline.
"use strict";

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g,
  (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

let last = null;          // the last document received
let lastOkAt = null;      // browser time it arrived
let skew = 0;             // server clock minus browser clock, seconds
let failingSince = null;  // browser time of the first failed poll in a row

function ago(serverTime) {
  if (serverTime == null) return "?";
  const s = Math.max(0, Date.now() / 1000 + skew - serverTime);
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}
const clock = (t) => new Date(t * 1000).toLocaleTimeString();
const num = (x, d = 0) => (x == null ? "–" : Number(x).toFixed(d));

function renderProblems(doc) {
  const el = $("problems");
  if (!doc.problems.length) {
    el.innerHTML = '<li class="none">No problems: every relay, path and probe is healthy.</li>';
    return;
  }
  el.innerHTML = doc.problems.map((p) =>
    `<li class="${esc(p.severity)}" data-code="${esc(p.code)}" data-subject="${esc(p.subject)}">` +
    `<strong>${esc(p.severity)}</strong> <code>${esc(p.code)}</code> ${esc(p.subject)} · ` +
    `${esc(p.message)} <span class="muted small">since ${ago(p.since)}</span></li>`).join("");
}

function renderSummary(doc) {
  const s = doc.summary, e = doc.etcd;
  const card = (label, value, cls = "") =>
    `<div class="card ${cls}"><div class="muted small">${label}</div><div class="v">${value}</div></div>`;
  $("summary").innerHTML =
    card("relays up", `${s.relays_up} / ${s.relays}`) +
    card("paths up", `${s.links_up} / ${s.links}`) +
    card("regions", s.regions) +
    card("etcd", e.reachable == null ? "–" : e.reachable ? "reachable" : "UNREACHABLE") +
    card("packets/s", num(last.history.pps_in.at(-1) ?? 0)) +
    card("errors · warnings", `${s.errors} · ${s.warnings}`);
}

function spark(title, series, times, unit, digits) {
  const w = 300, h = 70, pts = [];
  const vals = series.filter((v) => v != null);
  const max = Math.max(1e-9, ...vals);
  const t0 = times[0], t1 = times.at(-1);
  series.forEach((v, i) => {
    if (v == null) return;
    const x = t1 > t0 ? ((times[i] - t0) / (t1 - t0)) * w : w;
    pts.push(`${x.toFixed(1)},${(h - 4 - (v / max) * (h - 8)).toFixed(1)}`);
  });
  const now = vals.length ? num(vals.at(-1), digits) : "–";
  return `<div class="chart"><div class="t"><span>${title}</span><span><strong>${now}</strong> ${unit}` +
    ` <span class="muted small">max ${num(vals.length ? max : null, digits)}</span></span></div>` +
    `<svg viewBox="0 0 ${w} ${h}" preserveAspectRatio="none" role="img" aria-label="${title}">` +
    `<polyline fill="none" stroke="#2b6cb0" stroke-width="1.5" points="${pts.join(" ")}"/></svg></div>`;
}

function renderCharts(doc) {
  const h = doc.history;
  $("charts").innerHTML =
    spark("packets/s in", h.pps_in, h.t, "/s", 0) +
    spark("drops/s", h.drops_per_s, h.t, "/s", 1) +
    spark("round trip (median path)", h.rtt_ms, h.t, "ms", 1);
}

function renderRegions(doc) {
  const byId = new Map(doc.relays.map((r) => [r.relay_id, r]));
  $("regions").innerHTML = doc.regions.map((g) => {
    const relays = g.relays.map((id) => byId.get(id)).filter(Boolean);
    const rows = relays.map((r) => {
      const probe = r.probe ? (r.probe.ok ? `probe ${num(r.probe.rtt_ms, 1)} ms` : "probe FAILED") : "no probe";
      const figs = r.state === "left"
        ? "stopped as planned: left the mesh"
        : r.state === "down"
        ? esc(r.error || "no status")
        : `${num(r.clients)} clients · ${num(r.pps_in)}/${num(r.pps_out)} pkt/s in/out · ` +
          `${num(r.drops_per_s, 1)} drops/s · queued ${num(r.queued)} · ${probe} · v${esc(r.version)}`;
      return `<div class="relay" data-relay="${esc(r.relay_id)}" data-state="${esc(r.state)}">` +
        `<span class="dot"></span><span class="name">${esc(r.relay_id)}</span>` +
        `<span class="state">${esc(r.state)}${r.stale ? " (stale)" : ""} <span class="muted">${ago(r.since)}</span></span>` +
        `<span class="figs">${figs}</span></div>`;
    }).join("");
    // Relays that left as planned are listed, not counted.
    const left = g.left || 0, total = g.relays.length - left;
    const cls = g.up === 0 ? "bad" : g.up < total ? "warn" : "ok";
    return `<div class="region" data-region="${esc(g.region)}"><h3>${esc(g.region)}` +
      `<span class="badge ${cls} small">${g.up} / ${total} up${left ? ` · ${left} left` : ""}</span></h3>${rows}</div>`;
  }).join("");
}

function renderMatrix(doc) {
  // A relay that left as planned has no paths any more.
  const ids = doc.relays.filter((r) => r.state !== "left").map((r) => r.relay_id);
  const links = new Map(doc.links.map((l) => [`${l.src}>${l.dst}`, l]));
  const selfProbe = new Map(doc.relays.map((r) => [r.relay_id, r.probe]));
  const relayState = new Map(doc.relays.map((r) => [r.relay_id, r.state]));
  const dense = ids.length > 16;
  const rtts = doc.links.map((l) => l.rtt_ms).filter((x) => x != null).sort((a, b) => a - b);
  const slow = rtts.length ? Math.max(50, 3 * rtts[Math.floor(rtts.length / 2)]) : Infinity;
  let html = `<table class="matrix${dense ? " dense" : ""}"><thead><tr><th></th>` +
    ids.map((id) => `<th>${esc(id)}</th>`).join("") + "</tr></thead><tbody>";
  for (const src of ids) {
    html += `<tr><th>${esc(src)}</th>`;
    for (const dst of ids) {
      if (src === dst) {
        const p = selfProbe.get(src);
        const st = relayState.get(src) === "down" ? "down"
          : !p ? "unknown" : p.ok ? "up" : (p.failures >= 2 ? "down" : "unknown");
        html += `<td class="self" data-link="${esc(src)}>${esc(dst)}" data-state="${st}"` +
          ` title="${esc(src)} delivering to itself: ${p && p.ok ? num(p.rtt_ms, 1) + " ms" : esc(p ? p.error : "no probe")}">` +
          `${p && p.ok ? num(p.rtt_ms, 1) : ""}</td>`;
        continue;
      }
      const l = links.get(`${src}>${dst}`);
      const st = l ? l.state : "unknown";
      const lossy = l && l.drops_per_s > 0;
      let text = !l ? "" : l.state === "down" ? "down" : l.rtt_ms != null ? num(l.rtt_ms, 1) : "?";
      if (lossy) text += ` <span class="drops">−${num(l.drops_per_s, l.drops_per_s < 10 ? 1 : 0)}/s</span>`;
      const title = !l ? "no data" : `${src} → ${dst}: ${l.state}` +
        (l.rtt_ms != null ? `, round trip ${num(l.rtt_ms, 2)} ms` : "") +
        (l.pps != null ? `, ${num(l.pps, 1)} pkt/s` : "") +
        (l.drops_per_s != null ? `, ${num(l.drops_per_s, 1)} drops/s (${num(l.drops)} in all)` : "") +
        (l.probe_error ? `, probe: ${l.probe_error}` : "") + `, since ${ago(l.since)}`;
      const cls = lossy ? "lossy" : l && l.rtt_ms != null && l.rtt_ms > slow ? "slow" : "";
      html += `<td class="${cls}" data-link="${esc(src)}>${esc(dst)}" data-state="${esc(st)}"` +
        ` data-pps="${l && l.pps != null ? l.pps : ""}" data-drops="${l && l.drops_per_s != null ? l.drops_per_s : ""}"` +
        ` title="${esc(title)}">${text}</td>`;
    }
    html += "</tr>";
  }
  $("matrix").innerHTML = html + "</tbody></table>";
}

function renderEtcd(doc) {
  const e = doc.etcd;
  const yes = (v) => (v == null ? "–" : v ? "yes" : "NO");
  const lag = Object.entries(e.revision_lag).filter(([, n]) => n > 0)
    .map(([id, n]) => `${esc(id)} ${n}`).join(", ") || "none";
  $("etcd").innerHTML = `<div class="kv">` +
    `<span>reachable from ${esc(doc.served_by)}</span><strong>${yes(e.reachable)}</strong>` +
    `<span>lease held</span><strong>${yes(e.lease_held)}</strong>` +
    `<span>watch in sync</span><strong>${yes(e.synced)}</strong>` +
    `<span>revision</span><span>${num(e.revision)} (newest seen ${num(e.top_revision)})</span>` +
    `<span>watches behind</span><span>${lag}</span>` +
    `<span>unreachable from</span><span>${e.unreachable_from.map(esc).join(", ") || "no relay"}</span></div>`;
}

function renderEvents(doc) {
  $("events").innerHTML = doc.events.length
    ? doc.events.map((ev) => `<li data-kind="${esc(ev.kind)}" data-level="${esc(ev.level || "info")}"><span class="muted small">${clock(ev.at)}</span> ${esc(ev.message)}</li>`).join("")
    : '<li class="muted">nothing has changed since this relay started watching</li>';
}

function render(doc) {
  last = doc;
  const errors = doc.summary.errors, warnings = doc.summary.warnings;
  const overall = $("overall");
  overall.className = "badge " + (errors ? "bad" : warnings ? "warn" : "ok");
  overall.textContent = errors ? `${errors} error${errors > 1 ? "s" : ""}` :
    warnings ? `${warnings} warning${warnings > 1 ? "s" : ""}` : "healthy";
  document.body.dataset.healthy = String(doc.healthy);
  $("served-by").textContent = doc.served_by;
  renderProblems(doc); renderSummary(doc); renderCharts(doc);
  renderRegions(doc); renderMatrix(doc); renderEtcd(doc); renderEvents(doc);
}

function showConnection() {
  const banner = $("banner");
  const lost = failingSince != null;
  const staleDoc = last && !lost && (last.served_at - last.generated_at) > last.stale_after_s;
  document.body.dataset.conn = lost ? "lost" : staleDoc ? "stale" : last ? "live" : "connecting";
  if (lost) {
    banner.hidden = false;
    banner.textContent = last
      ? `Lost contact with ${last.served_by}, the relay serving this page, at ` +
        `${new Date(failingSince).toLocaleTimeString()}. What you see is from ` +
        `${new Date(lastOkAt).toLocaleTimeString()} and may be wrong; retrying.`
      : "Cannot reach the relay serving this page; retrying.";
    $("overall").className = "badge bad";
    $("overall").textContent = "no contact";
  } else if (staleDoc) {
    banner.hidden = false;
    banner.textContent = `${last.served_by} stopped refreshing the mesh status ` +
      `${ago(last.generated_at)} ago: figures are stale.`;
  } else {
    banner.hidden = true;
  }
  $("updated").textContent = lastOkAt
    ? `updated ${new Date(lastOkAt).toLocaleTimeString()} (${Math.round((Date.now() - lastOkAt) / 1000)} s ago)`
    : "not updated yet";
}

async function poll() {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), 4000);
  try {
    const resp = await fetch("/api/v1/mesh", { cache: "no-store", signal: ctl.signal });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const doc = await resp.json();
    skew = doc.served_at - Date.now() / 1000;
    lastOkAt = Date.now();
    failingSince = null;
    render(doc);
  } catch (err) {
    if (failingSince == null) failingSince = Date.now();
  } finally {
    clearTimeout(timer);
  }
  showConnection();
  const every = last ? Math.min(5, Math.max(1, last.interval_s)) : 2;
  setTimeout(poll, every * 1000);
}

setInterval(showConnection, 1000);
poll();
