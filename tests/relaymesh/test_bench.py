"""`relaymesh bench` runs end to end and reports what it promises (no speed assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

from relaymesh.bench.fairness import describe, run_fairness


def test_bench_json_has_relay_and_baseline() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "relaymesh.cli",
            "bench",
            "--size",
            "1200",
            "--seconds",
            "0.5",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["size"] == 1200
    for target in ("relay", "baseline"):
        r = result[target]
        for field in ("pps", "mbps", "p50_ms", "p99_ms"):
            assert r[field] > 0, (target, field, r)
        # The stream is numbered: nothing arrives out of order, and nothing is counted twice.
        assert r["reordered"] == 0
        assert 0 < r["received"] <= r["sent"]
    assert result["baseline"]["name"]
    assert result["relay"]["p50_ms"] <= result["relay"]["p99_ms"]


def test_bench_rejects_a_size_it_cannot_carry() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relaymesh.cli", "bench", "--size", "4", "--seconds", "0.1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "--size must be between" in out.stderr


def test_fairness_scenario_reports_the_victim_alone_and_under_a_flood() -> None:
    result = run_fairness(size=1200, seconds=0.3, runs=1, floods=("keepalive", "preauth"))
    assert result["scenario"] == "fairness"
    victim = result["victim"]
    assert set(victim) == {"none", "keepalive", "preauth"}
    for kind in ("keepalive", "preauth"):
        assert victim[kind]["pps"] > 0
        assert victim[kind]["pps_ratio"] > 0
        # The flooder did flood: at least its first 1 MiB message went out.
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
