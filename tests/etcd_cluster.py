"""Real etcd servers for tests: one member or a cluster, on free loopback ports.

The launcher is relaymesh/procs.py (the same one `relaymesh up --etcd auto` and
the benchmarks use); this adds only the skip for a machine without etcd.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from relaymesh.procs import EtcdCluster, EtcdMember, free_port, start_etcd

__all__ = ["EtcdCluster", "EtcdMember", "free_port", "need_etcd", "start_cluster"]


def need_etcd() -> str:
    path = shutil.which("etcd")
    if path is None:
        pytest.skip(
            "the etcd binary is not installed (Debian package etcd-server; tests/run.sh"
            " installs it as root)"
        )
    return path


def start_cluster(tmp: Path, size: int = 1) -> EtcdCluster:
    need_etcd()
    return start_etcd(tmp, size)
