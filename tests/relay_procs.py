"""Relay processes for integration tests: `relaymesh relay` as an operator runs it.

Started through relaymesh/procs.py, the launcher `relaymesh up` and the
benchmarks use; this adds the test mesh's short lease timings.
"""

from __future__ import annotations

from pathlib import Path

from relaymesh.procs import RelayProc, start_relay

__all__ = ["MESH_TEST_CONFIG", "TEST_MESH_KEY", "RelayProc", "start_relay_proc"]

TEST_MESH_KEY = "test-mesh-key-0123456789abcdef"

MESH_TEST_CONFIG = """
[mesh]
lease_ttl_s = 2
keepalive_interval_s = 0.5
lost_grace_s = 30

# The tests count clients, peers and forwarded packets: no probe traffic.
[health]
enabled = false
"""


def start_relay_proc(
    tmp: Path,
    endpoints: list[str],
    region: str,
    name: str,
    *,
    mesh_key: str = TEST_MESH_KEY,
) -> RelayProc:
    cfg = tmp / "relay-test.toml"
    if not cfg.exists():
        cfg.write_text(MESH_TEST_CONFIG)
    key_file = tmp / f"mesh-{abs(hash(mesh_key))}.key"
    if not key_file.exists():
        key_file.write_text(mesh_key + "\n")
    return start_relay(
        tmp,
        region=region,
        name=name,
        etcd=endpoints,
        mesh_key_file=key_file,
        config=cfg,
        log_level="info",
    )
