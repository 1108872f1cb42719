"""Mesh health aggregation and problems (relay/health.py): pure, no I/O, no clock."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from coordinator.registry import RelayRecord
from relay.health import PROBLEM_CODES, Fetch, HealthThresholds, MeshHealth

T = HealthThresholds(interval_s=1.0, stale_after_s=3.0, probe_failures=2, drops_high_per_s=10)


def record(rid: str, region: str, started_at: float = 1.0) -> RelayRecord:
    return RelayRecord(
        relay_id=rid,
        region=region,
        name=rid,
        ws_url=f"ws://{rid}/derp",
        http_url=f"http://{rid}",
        public_key="nodekey:" + "00" * 32,
        started_at=started_at,
        version="0.1.0",
    )


def status(
    rid: str,
    peers: list[str],
    *,
    packets: int = 0,
    drops: int = 0,
    connected: bool = True,
    probe_ok: bool = True,
    failures: int = 0,
    degraded: str | None = None,
    revision: int = 10,
    link_drops: int = 0,
    draining: bool = False,
) -> dict[str, Any]:
    """What /api/v1/status says for relay ``rid`` probing itself and ``peers``."""
    return {
        "name": rid,
        "stats": {
            "clients": 2,
            "packets_in": packets,
            "packets_out": packets,
            "drops": {"queue_full": drops},
            "rate_limited_s": 0.0,
        },
        "draining": draining,
        "queues": {"data_queued": 0, "data_queued_max": 0},
        "shared_state": {
            "registered": degraded is None,
            "synced": True,
            "degraded": degraded,
            "revision": revision,
        },
        "mesh_links": [
            {
                "relay_id": p,
                "connected": connected,
                "packets_sent": packets,
                "queued": 0,
                "drops": link_drops,
            }
            for p in peers
            if p != rid
        ],
        "probes": [
            {
                "src": rid,
                "dst": p,
                "ok": probe_ok if p != rid else True,
                "rtt_ms": 1.5 if (probe_ok or p == rid) else None,
                "failures": failures if p != rid else 0,
                "error": None if probe_ok else "no answer within 1 s",
            }
            for p in [rid, *peers]
        ],
    }


def codes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(p["code"], p["subject"]) for p in doc["problems"]}


def two_relays() -> tuple[MeshHealth, list[RelayRecord]]:
    return MeshHealth("eu-1", T), [record("eu-1", "eu"), record("us-1", "us")]


def healthy(ids: list[str] = ["eu-1", "us-1"], **kw: Any) -> dict[str, Fetch]:  # noqa: B006
    return {rid: Fetch(doc=status(rid, [p for p in ids if p != rid], **kw)) for rid in ids}


def test_healthy_mesh_has_no_problem_and_every_path_up() -> None:
    h, reg = two_relays()
    doc = h.update(100.0, reg, healthy())
    assert doc["problems"] == [] and doc["healthy"] is True
    assert [r["state"] for r in doc["relays"]] == ["up", "up"]
    assert {(x["src"], x["dst"], x["state"]) for x in doc["links"]} == {
        ("eu-1", "us-1", "up"),
        ("us-1", "eu-1", "up"),
    }
    assert doc["summary"] == {
        "relays": 2,
        "relays_up": 2,
        "relays_left": 0,
        "regions": 2,
        "links": 2,
        "links_up": 2,
        "errors": 0,
        "warnings": 0,
    }
    assert [e["kind"] for e in doc["events"]] == ["relay_joined", "relay_joined"]


def test_unreachable_relay_is_stale_then_down_never_healthy() -> None:
    h, reg = two_relays()
    h.update(100.0, reg, healthy())
    fetches = {"eu-1": healthy()["eu-1"], "us-1": Fetch(error="status unreachable: ConnectError")}
    doc = h.update(101.0, reg, fetches)
    us = doc["relays"][1]
    assert us["state"] == "stale" and us["stale"] is True
    assert ("relay_stale", "us-1") in codes(doc)
    assert doc["links"][0]["state"] != "up" or doc["links"][1]["state"] != "up"
    doc = h.update(104.5, reg, fetches)
    assert doc["relays"][1]["state"] == "down" and doc["relays"][1]["clients"] is None
    assert codes(doc) == {("relay_down", "us-1"), ("region_without_relay", "us")}
    assert all(x["state"] == "down" for x in doc["links"])
    assert doc["healthy"] is False
    assert doc["problems"][0]["since"] == 104.5
    assert doc["events"][0]["kind"] == "relay_down"
    assert "ConnectError" in doc["events"][0]["message"]


def test_relay_gone_from_registry_is_down_at_once_then_forgotten() -> None:
    h, reg = two_relays()
    h.update(100.0, reg, healthy())
    doc = h.update(101.0, reg[:1], healthy(["eu-1"]))
    assert doc["relays"][1]["state"] == "down"
    assert ("relay_down", "us-1") in codes(doc)
    assert [e["kind"] for e in doc["events"][:2]] == ["relay_down", "relay_left"]
    doc = h.update(101.0 + T.forget_after_s + 1, reg[:1], healthy(["eu-1"]))
    assert [r["relay_id"] for r in doc["relays"]] == ["eu-1"]
    # The region stays known: it has no relay now, and that is a problem.
    assert codes(doc) == {("region_without_relay", "us")}


def test_relay_that_drained_then_left_is_left_not_down() -> None:
    h = MeshHealth("eu-1", T)
    reg = [record("eu-1", "eu"), record("us-1", "us"), record("us-2", "us")]
    ids = ["eu-1", "us-1", "us-2"]
    h.update(100.0, reg, healthy(ids))
    # us-1 announces its stop: its record says leaving, then its status says draining.
    leaving = [reg[0], replace(reg[1], leaving_at=100.5), reg[2]]
    doc = h.update(101.0, leaving, healthy(ids))
    assert doc["relays"][1]["state"] == "draining"
    # Its HTTP port closes before its record goes: still draining, not stale.
    doc = h.update(102.0, leaving, {**healthy(ids), "us-1": Fetch(error="status unreachable")})
    assert doc["relays"][1]["state"] == "draining" and doc["relays"][1]["stale"] is True
    assert codes(doc) == {("relay_draining", "us-1")}
    doc = h.update(103.0, [reg[0], reg[2]], healthy(["eu-1", "us-2"]))
    us1 = doc["relays"][1]
    assert (us1["relay_id"], us1["state"], us1["since"], us1["error"]) == (
        "us-1",
        "left",
        103.0,
        None,
    )
    assert doc["problems"] == [] and doc["healthy"] is True
    assert doc["events"][0] == {
        "at": 103.0,
        "kind": "relay_left",
        "level": "info",
        "subject": "us-1",
        "message": "us-1: relay left (planned)",
    }
    assert "relay_down" not in [e["kind"] for e in doc["events"]]
    # Out of the path matrix and of the counts; still listed, in its region.
    assert {(x["src"], x["dst"]) for x in doc["links"]} == {("eu-1", "us-2"), ("us-2", "eu-1")}
    assert (doc["summary"]["relays"], doc["summary"]["relays_left"]) == (2, 1)
    assert next(g for g in doc["regions"] if g["region"] == "us") == {
        "region": "us",
        "relays": ["us-1", "us-2"],
        "up": 1,
        "left": 1,
    }
    doc = h.update(104.0, [reg[0], reg[2]], healthy(["eu-1", "us-2"]))
    assert doc["problems"] == [] and doc["relays"][1]["since"] == 103.0
    # Restarted under the same name: back, and up.
    doc = h.update(105.0, [reg[0], record("us-1", "us", started_at=2.0), reg[2]], healthy(ids))
    assert doc["relays"][1]["state"] == "up" and doc["problems"] == []
    assert doc["events"][0]["message"] == "us-1 is back"


def test_announcement_between_two_rounds_still_counts_through_departed() -> None:
    h, reg = two_relays()
    h.update(100.0, reg, healthy())
    # Its leaving record and its deletion both came and went since the last round.
    doc = h.update(101.0, reg[:1], healthy(["eu-1"]), departed={"us-1"})
    assert doc["relays"][1]["state"] == "left"
    assert doc["events"][0]["message"] == "us-1: relay left (planned)"
    # The last relay of its region has gone, planned or not: that is a problem.
    assert codes(doc) == {("region_without_relay", "us")}
    assert "relay_down" not in {c for c, _ in codes(doc)}


def test_relay_that_vanished_unannounced_is_down() -> None:
    h = MeshHealth("eu-1", T)
    reg = [record("eu-1", "eu"), record("us-1", "us"), record("us-2", "us")]
    ids = ["eu-1", "us-1", "us-2"]
    h.update(100.0, reg, healthy(ids))
    # Another relay's planned stop does not make this one's disappearance planned.
    doc = h.update(101.0, [reg[0], reg[2]], healthy(["eu-1", "us-2"]), departed={"us-9"})
    assert doc["relays"][1]["state"] == "down"
    assert codes(doc) == {("relay_down", "us-1")}
    assert [(e["kind"], e["level"]) for e in doc["events"][:2]] == [
        ("relay_down", "error"),
        ("relay_left", "warning"),
    ]


def test_restarted_relay_comes_back_up_and_the_problem_clears() -> None:
    h, reg = two_relays()
    h.update(100.0, reg, healthy())
    h.update(101.0, reg[:1], healthy(["eu-1"]))
    since_down = h.update(102.0, reg[:1], healthy(["eu-1"]))["problems"][0]["since"]
    assert since_down == 101.0  # since when, kept across rounds
    again = [reg[0], record("us-1", "us", started_at=2.0)]
    doc = h.update(103.0, again, healthy())
    assert doc["problems"] == []
    assert doc["events"][0]["kind"] == "relay_up"
    assert "relay_joined" in [e["kind"] for e in doc["events"]]


def test_probe_failure_over_a_connected_link_is_probe_failed() -> None:
    h, reg = two_relays()
    fetches = {
        "eu-1": Fetch(doc=status("eu-1", ["us-1"], probe_ok=False, failures=1)),
        "us-1": healthy()["us-1"],
    }
    doc = h.update(100.0, reg, fetches)
    assert doc["problems"] == []  # one failure is not yet a problem
    fetches["eu-1"] = Fetch(doc=status("eu-1", ["us-1"], probe_ok=False, failures=2))
    doc = h.update(101.0, reg, fetches)
    assert codes(doc) == {("probe_failed", "eu-1>us-1")}
    link = next(x for x in doc["links"] if x["src"] == "eu-1")
    assert link["state"] == "down" and link["connected"] is True
    assert "no answer" in doc["problems"][0]["message"]
    assert doc["events"][0]["kind"] == "link_down"


def test_disconnected_link_is_mesh_link_down() -> None:
    h, reg = two_relays()
    fetches = {"eu-1": Fetch(doc=status("eu-1", ["us-1"], connected=False)), **{}}
    fetches["us-1"] = healthy()["us-1"]
    doc = h.update(100.0, reg, fetches)
    assert codes(doc) == {("mesh_link_down", "eu-1>us-1")}
    assert doc["problems"][0]["severity"] == "error"


def test_etcd_lost_and_back() -> None:
    h, reg = two_relays()
    h.update(100.0, reg, healthy())
    doc = h.update(101.0, reg, healthy(degraded="shared state unreachable: timeout"))
    assert codes(doc) == {("etcd_unreachable", "eu-1"), ("etcd_unreachable", "us-1")}
    assert doc["etcd"]["reachable"] is False
    assert doc["etcd"]["unreachable_from"] == ["eu-1", "us-1"]
    assert {e["kind"] for e in doc["events"][:2]} == {"etcd_lost"}
    doc = h.update(102.0, reg, healthy())
    assert doc["problems"] == [] and doc["events"][0]["kind"] == "etcd_back"


def test_rates_from_counters_and_drops_high() -> None:
    h, reg = two_relays()
    h.update(100.0, reg, healthy())
    doc = h.update(102.0, reg, healthy(packets=400, drops=100))
    eu = doc["relays"][0]
    assert eu["pps_in"] == 200.0 and eu["drops_per_s"] == 50.0
    assert codes(doc) == {("drops_high", "eu-1"), ("drops_high", "us-1")}
    assert all(p["severity"] == "warning" for p in doc["problems"])
    assert doc["healthy"] is True  # warnings only
    assert doc["history"]["pps_in"][-1] == 400.0


def test_each_directed_link_has_its_packets_and_drops_per_second() -> None:
    h, reg = two_relays()
    h.update(100.0, reg, healthy())
    fetches = {
        "eu-1": Fetch(doc=status("eu-1", ["us-1"], packets=300, link_drops=40)),
        "us-1": Fetch(doc=status("us-1", ["eu-1"], packets=100)),
    }
    doc = h.update(102.0, reg, fetches)
    links = {(x["src"], x["dst"]): x for x in doc["links"]}
    assert links["eu-1", "us-1"]["pps"] == 150.0 and links["eu-1", "us-1"]["drops_per_s"] == 20.0
    assert links["eu-1", "us-1"]["drops"] == 40
    assert links["us-1", "eu-1"]["pps"] == 50.0 and links["us-1", "eu-1"]["drops_per_s"] == 0.0
    # A relay that restarts starts its counters again: no negative rate, no spike.
    again = [reg[0], record("us-1", "us", started_at=2.0)]
    doc = h.update(104.0, again, healthy())
    assert all(x["drops_per_s"] == 0.0 for x in doc["links"])


def test_clients_moving_to_a_sibling_are_a_failover_event() -> None:
    h = MeshHealth("eu-1", T)
    reg = [record("eu-1", "eu"), record("us-1", "us"), record("us-2", "us")]
    ids = ["eu-1", "us-1", "us-2"]
    a, b, c, d = (bytes([n]) * 32 for n in range(4))
    homes = [(a, "us-1"), (b, "us-1"), (c, "us-1"), (d, "eu-1")]
    doc = h.update(100.0, reg, healthy(ids), homes)
    assert "failover" not in [e["kind"] for e in doc["events"]]  # first sight is no move
    # us-1 drains: two of its clients are already on us-2, one is between relays.
    fetches = {**healthy(ids), "us-1": Fetch(doc=status("us-1", ["eu-1", "us-2"], draining=True))}
    doc = h.update(101.0, reg, fetches, [(a, "us-2"), (b, "us-2"), (d, "eu-1")])
    failovers = [e for e in doc["events"] if e["kind"] == "failover"]
    assert failovers == [
        {
            "at": 101.0,
            "kind": "failover",
            "level": "info",
            "subject": "us-1>us-2",
            "message": "2 clients moved from us-1 to us-2 (us-1 is draining)",
        }
    ]
    assert doc["relays"][1]["state"] == "draining"
    assert ("relay_draining", "us-1") in codes(doc)
    # The third comes back a round later, elsewhere; nothing that stays put is an event.
    doc = h.update(102.0, reg, healthy(ids), [(a, "us-2"), (b, "us-2"), (c, "eu-1"), (d, "eu-1")])
    assert next(e["message"] for e in doc["events"] if e["kind"] == "failover") == (
        "1 client moved from us-1 to eu-1"
    )
    doc = h.update(103.0, reg, healthy(ids), [(a, "us-2"), (b, "us-2"), (c, "eu-1"), (d, "eu-1")])
    assert len([e for e in doc["events"] if e["kind"] == "failover"]) == 2
    # A key not seen for forget_after_s is forgotten: its return is not a move.
    later = 103.0 + T.forget_after_s + 1
    h.update(later, reg, healthy(ids), [])
    doc = h.update(later + 1, reg, healthy(ids), [(a, "eu-1")])
    assert len([e for e in doc["events"] if e["kind"] == "failover"]) == 2


def test_revision_lag_against_the_most_advanced_watch() -> None:
    h, reg = two_relays()
    fetches = {
        "eu-1": Fetch(doc=status("eu-1", ["us-1"], revision=50)),
        "us-1": Fetch(doc=status("us-1", ["eu-1"], revision=42)),
    }
    doc = h.update(100.0, reg, fetches)
    assert doc["etcd"]["revision_lag"] == {"eu-1": 0, "us-1": 8}


def test_history_is_bounded_and_events_too() -> None:
    h = MeshHealth("eu-1", HealthThresholds(interval_s=1.0, history_s=10.0, events=5))
    reg = [record("eu-1", "eu")]
    for i in range(50):
        # In and out of the registry: an event each round.
        doc = h.update(100.0 + i * 10, reg if i % 2 else [], healthy(["eu-1"]))
    assert len(doc["history"]["t"]) == 11
    assert len(doc["events"]) == 5


def test_problem_codes_are_documented() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "health.md").read_text()
    for code, severity in PROBLEM_CODES.items():
        assert f"`{code}`" in text and severity in text


def big_mesh_document(regions: int, per_region: int, rounds: int = 12) -> dict[str, Any]:
    """The document of a healthy mesh of ``regions`` x ``per_region`` relays, one relay down."""
    ids = [f"r{g:02d}-{i}" for g in range(1, regions + 1) for i in range(1, per_region + 1)]
    reg = [record(rid, rid.split("-")[0]) for rid in ids]
    base = {rid: status(rid, [p for p in ids if p != rid]) for rid in ids}
    h = MeshHealth(ids[0], HealthThresholds(interval_s=5.0, stale_after_s=15.0))
    t = 1000.0
    for n in range(1, rounds + 1):
        fetches = {
            rid: Fetch(doc={**doc, "stats": {**doc["stats"], "packets_in": n * 1000}})
            for rid, doc in base.items()
        }
        if n > rounds - 10:
            fetches[ids[7]] = Fetch(error="status unreachable: ConnectError")
        doc = h.update(t + n * 5, reg, fetches)
    return doc


def test_large_mesh_document() -> None:
    doc = big_mesh_document(regions=4, per_region=3, rounds=200)
    assert doc["summary"]["relays"] == 12 and doc["summary"]["links"] == 12 * 11
    assert ("relay_down", "r03-2") in codes(doc)
    assert len(doc["history"]["t"]) == 181  # 15 minutes of 5 s rounds
