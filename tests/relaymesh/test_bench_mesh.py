"""The mesh benchmarks' work directory (mesh key included) is gone when a run ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

from relaymesh.bench import mesh as bench_mesh
from tests.etcd_cluster import need_etcd

pytestmark = pytest.mark.slow


def _workdirs(root: Path) -> list[Path]:
    return sorted(root.glob("relaymesh-bench-*"))


@pytest.fixture
def tmp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    need_etcd()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_short_registration_run_leaves_no_work_directory(tmp_root: Path) -> None:
    with bench_mesh._mesh([("eu", "eu-1"), ("us", "us-1")]) as (relays, _):
        (workdir,) = _workdirs(tmp_root)
        assert (workdir / "mesh.key").stat().st_mode & 0o077 == 0
        # Two clients through the real scenario: the operator token opens the peer API.
        result = trio.run(bench_mesh._registration, relays, 2)
        assert result["clients"] == 2
    assert _workdirs(tmp_root) == []


def test_an_error_mid_run_leaves_no_work_directory(tmp_root: Path) -> None:
    with (
        pytest.raises(KeyboardInterrupt),
        bench_mesh._mesh([("eu", "eu-1")]) as (relays, _),
    ):
        assert len(_workdirs(tmp_root)) == 1
        relay = relays[0]["proc"]
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
    assert relay.poll() is not None
    assert _workdirs(tmp_root) == []


def test_sigterm_mid_run_leaves_no_work_directory(tmp_root: Path) -> None:
    """A bench process stopped with SIGTERM while its relays run cleans up too."""
    script = (
        "import tempfile, time, sys\n"
        f"tempfile.tempdir = {str(tmp_root)!r}\n"
        "from relaymesh.bench import mesh as bench_mesh\n"
        "with bench_mesh._mesh([('eu', 'eu-1')]):\n"
        "    print('up', flush=True)\n"
        "    time.sleep(60)\n"
    )
    # Its own process group: if cleanup fails, the test still ends the etcd and relay it left.
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "up"
        assert len(_workdirs(tmp_root)) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _workdirs(tmp_root) == []


def test_mesh_scenario_reports_each_run(tmp_root: Path) -> None:
    result = bench_mesh.run_mesh(1200, 0.3, runs=2, progress=False)
    for path in ("within_one_relay", "across_mesh_hop"):
        runs = result[path]["runs"]
        assert len(runs) == 2
        for r in runs:
            assert 0 < r["received"] <= r["sent"] and r["reordered"] == 0
            assert isinstance(r["drops"], dict)
        assert result[path]["summary"]["pps"]["min"] <= result[path]["summary"]["pps"]["max"]
    # Both relays' CPU is read across the hop, one relay's within it.
    assert [len(r["server_cpu_pct_each"]) for r in result["across_mesh_hop"]["runs"]] == [2, 2]
    assert [len(r["server_cpu_pct_each"]) for r in result["within_one_relay"]["runs"]] == [1, 1]
    assert len(result["mesh_vs_within"]["per_run"]) == 2
    assert _workdirs(tmp_root) == []
