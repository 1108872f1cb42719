"""The reference deployment: docker-compose.yml and the per-relay configs it mounts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from relay.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RELAYS = [f"{r}-{n}" for r in ("eu", "us", "ap") for n in (1, 2)]


@pytest.mark.parametrize("name", RELAYS)
def test_each_relay_config_loads_and_names_itself(name: str) -> None:
    cfg = load_config(ROOT / "config" / f"{name}.toml")
    assert cfg.relay.name == name and cfg.relay.region == name.split("-")[0]
    assert cfg.relay.listen_host == "0.0.0.0"
    assert cfg.mesh.advertise_host == name
    assert len(cfg.mesh.etcd_endpoints) == 3


def test_compose_file_is_valid_and_matches_the_configs(tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip(
            "docker-compose is not installed (Debian package docker-compose;"
            " tests/run.sh installs it as root)"
        )
    # A throwaway copy, so the secret file the compose file names can exist.
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "config", work / "config")
    shutil.copy(ROOT / "docker-compose.yml", work / "docker-compose.yml")
    (work / "config" / "mesh.key").write_text("0" * 64)
    out = subprocess.run(
        [compose, "config", "--services"], cwd=work, capture_output=True, text=True, check=True
    )
    services = set(out.stdout.split())
    assert services == {"etcd1", "etcd2", "etcd3", *RELAYS}
    full = subprocess.run(
        [compose, "config"], cwd=work, capture_output=True, text=True, check=True
    ).stdout
    for i, name in enumerate(RELAYS):
        assert f"/etc/relaymesh/{name}.toml" in full
        assert f"published: {3340 + 2 * i}" in full or f"{3340 + 2 * i}:3340" in full
