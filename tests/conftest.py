"""Shared test helpers: relays on loopback port 0, inside the test's nursery.

In CI (``CI`` set) a skipped test fails the run: CI installs everything the
suite needs, so a skip there means something is missing, not optional.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from relay.config import load_config
from relay.protocol.keys import PrivateKey
from relay.server import RelayServer
from tests.etcd_cluster import EtcdCluster, start_cluster


async def start_relay(
    nursery: trio.Nursery,
    *,
    port: int = 0,
    key: PrivateKey | None = None,
    tokens: frozenset[str] = frozenset(),
    admission: dict[str, Any] | None = None,
    **limits: Any,
) -> tuple[RelayServer, str]:
    """A RelayServer on 127.0.0.1 and its ws:// URL; it stops with ``nursery``."""
    overrides: dict[str, dict[str, Any]] = {"limits": limits}
    if admission:
        overrides["admission"] = admission
    cfg = load_config(overrides=overrides)
    server = RelayServer(cfg, key or PrivateKey.generate(), tokens=tokens)
    bound = await nursery.start(server.serve, "127.0.0.1", port)
    return server, f"ws://127.0.0.1:{bound}/derp"


async def wait_until(predicate: Callable[[], object], interval_s: float = 0.005) -> None:
    """Until ``predicate()`` is true. Tests wrap it in ``fail_after`` so a hang fails fast."""
    while not predicate():  # noqa: ASYNC110 - tests watch state they do not own
        await trio.sleep(interval_s)


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not os.environ.get("CI") or reporter is None:
        return
    skipped = reporter.stats.get("skipped", [])
    if skipped and exitstatus == 0:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; CI must run every test", red=True)
        session.exitstatus = 1


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One real etcd member for the session; tests use their own key prefixes."""
    cluster = start_cluster(tmp_path_factory.mktemp("etcd"))
    try:
        yield cluster
    finally:
        cluster.stop_all()
