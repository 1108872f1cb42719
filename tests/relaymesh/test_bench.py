"""`relaymesh bench` runs end to end and reports what it promises (no speed assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from relaymesh.bench.load import run_load


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
    assert flood["preauth_shed"] >= 200 and flood["internal_errors"] == 0
    assert result["skipped"] == []
    assert list(tmp_path.glob("relaymesh-bench-load-*")) == []


def test_bench_load_rejects_zero_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relaymesh.cli", "bench", "--scenario", "load", "--runs", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "--runs must be at least 1" in out.stderr
