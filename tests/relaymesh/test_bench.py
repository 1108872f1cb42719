"""`relaymesh bench` runs end to end and reports what it promises (no speed assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from relaymesh.bench.fairness import describe, run_fairness
from relaymesh.bench.load import run_load
from relaymesh.bench.relay import ratio, spread

_CPU_FIELDS = ("server_cpu_pct", "senders_cpu_pct", "receivers_cpu_pct")


def _bench(*args: str, timeout: float = 240) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "relaymesh.cli", "bench", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _check_runs(runs: list[dict[str, Any]], n: int) -> None:
    assert len(runs) == n
    for r in runs:
        for field in ("pps", "mbps", "p50_ms", "p99_ms", "steady_s"):
            assert r[field] > 0, (field, r)
        for field in _CPU_FIELDS:
            assert isinstance(r[field], float), (field, r)
        # The stream is numbered: nothing arrives out of order, and nothing is counted twice.
        assert r["reordered"] == 0
        assert 0 < r["received"] <= r["sent"]
        assert r["loss_pct"] == round(100 * (1 - r["received"] / r["sent"]), 3)
        assert r["p50_ms"] <= r["p99_ms"]


def test_bench_json_has_the_relay_and_both_ceilings_per_run() -> None:
    result = _bench("--size", "1200", "--seconds", "0.5", "--runs", "2")
    assert result["runs"] == 2
    (entry,) = result["sizes"]
    assert entry["size"] == 1200
    targets = entry["targets"]
    assert set(targets) == {"relay", "tcp_copy", "ws_copy"}
    for t in targets.values():
        assert t["name"]
        _check_runs(t["runs"], 2)
        pps = [r["pps"] for r in t["runs"]]
        assert t["summary"]["pps"] == spread(pps)
    for ceiling in ("tcp_copy", "ws_copy"):
        vs = entry["relay_vs"][ceiling]
        assert len(vs["per_run"]) == 2
        assert vs["min"] <= vs["median"] <= vs["max"]
    # CPU is counted in clock ticks, so a starved process can read 0 in one short
    # window; the relay, reading and writing every packet, not in all of them.
    assert sum(r["server_cpu_pct"] for r in targets["relay"]["runs"]) > 0
    # The relay reports what it dropped, by reason, during each run.
    assert all(isinstance(r["drops"], dict) for r in targets["relay"]["runs"])


def test_bench_table_prints_loss_and_cpu_per_run() -> None:
    args = ["--size", "100", "--seconds", "0.3", "--runs", "2", "--no-baseline"]
    out = subprocess.run(
        [sys.executable, "-m", "relaymesh.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "100-byte packets" in out.stdout
    (loss,) = [
        line for line in out.stdout.splitlines() if "relaymesh relay" in line and "loss" in line
    ]
    assert loss.count("→") == 2
    assert "TCP byte copy" not in out.stdout


def test_ratio_is_per_run_and_of_the_medians() -> None:
    part = [{"pps": 50}, {"pps": 30}, {"pps": 10}]
    whole = [{"pps": 100}, {"pps": 100}, {"pps": 20}]
    r = ratio(part, whole)
    assert r["per_run"] == [50.0, 30.0, 50.0]
    assert (r["min"], r["median"], r["max"]) == (30.0, 50.0, 50.0)
    assert r["of_medians"] == 30.0


def test_bench_rejects_a_size_it_cannot_carry() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relaymesh.cli", "bench", "--size", "4", "--seconds", "0.1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "--size must be between" in out.stderr


@pytest.mark.slow
def test_fairness_scenario_reports_the_victim_alone_and_under_a_flood() -> None:
    result = run_fairness(size=1200, seconds=0.3, runs=1, floods=("keepalive", "preauth"))
    assert result["scenario"] == "fairness"
    victim = result["victim"]
    assert set(victim) == {"none", "keepalive", "preauth"}
    for kind in ("keepalive", "preauth"):
        assert victim[kind]["pps"] > 0
        assert victim[kind]["pps_ratio"] > 0
        # The flooder did flood: at least its first 64 KiB message went out.
        assert victim[kind]["flood_messages"][0] >= 1
    assert "keepalive" in describe(result)


def test_fairness_scenario_rejects_a_size_it_cannot_carry() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relaymesh.cli", "bench", "--scenario", "fairness", "--size", "4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "--size must be between" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_short_load_run_counts_every_client_and_leaves_no_work_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run_load(clients=(50,), preauth=(1200,), runs=1, probes=3)
    (memory,) = result["memory"]
    (run,) = memory["per_run"]
    assert run["clients"] == 50
    assert run["rss_bytes"] > run["empty_rss_bytes"] > 0
    assert memory["handshakes_per_s"] > 0
    (preauth,) = result["preauth"]
    # Over the relay's cap of 1,000: the flood was shed, the relay stayed up, and
    # every normal connect got in.
    assert preauth["relay_survived"]
    assert preauth["connects"] == 3 and preauth["connect_failed"] == 0
    (flood,) = preauth["per_run"]
    assert flood["preauth_shed"] + flood["preauth_refused"] >= 200
    assert flood["internal_errors"] == 0
    assert result["skipped"] == []
    assert list(tmp_path.glob("relaymesh-bench-load-*")) == []
