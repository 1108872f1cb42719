"""The reference deployment: docker-compose.yml, the per-relay configs it mounts, Prometheus.

What clients are told (the URLs a relay registers and the region map it
serves) must be reachable from the host: every advertised port published,
with its protocol. What relays use among themselves must be the service
name and a port the container listens on.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from coordinator.registry import RelayRecord
from region.live import live_map
from region.model import load_region_map
from relay.addresses import relay_addresses
from relay.config import load_config
from relay.protocol.keys import PrivateKey
from tests.compose_file import (
    ETCD,
    RELAYS,
    ROOT,
    compose_config,
    host_path,
    parse_port,
    relay_config,
)


@pytest.mark.parametrize("name", RELAYS)
def test_each_relay_config_loads_and_names_itself(name: str) -> None:
    cfg = load_config(ROOT / "config" / f"{name}.toml")
    assert cfg.relay.name == name and cfg.relay.region == name.split("-")[0]
    assert cfg.relay.listen_host == "0.0.0.0"
    assert cfg.mesh.advertise_host == name
    assert len(cfg.mesh.etcd_endpoints) == 3
    assert cfg.region_map.file == ROOT / "config" / "regions.toml"  # beside the config file
    assert cfg.admission.policy == "token"


@pytest.mark.parametrize("public_host", [None, "203.0.113.7"])
def test_every_advertised_url_is_published_with_its_protocol(
    tmp_path: Path, public_host: str | None
) -> None:
    env = {"RELAYMESH_PUBLIC_HOST": public_host} if public_host else {}
    doc = compose_config(tmp_path / "repo", env)
    services = doc["services"]
    assert set(services) == {*ETCD, *RELAYS, "prometheus"}
    want_host = public_host or "127.0.0.1"
    records = []
    for name in RELAYS:
        svc = services[name]
        cfg = relay_config(svc)
        assert {s["source"] for s in svc["secrets"]} == {"mesh_key", "relay_tokens"}
        for path in (cfg.mesh.mesh_key_file, cfg.admission.tokens_file):
            assert path is not None and str(path).startswith("/run/secrets/")
        published = {(p.published, p.protocol): p.target for p in map(parse_port, svc["ports"])}
        addr = relay_addresses(
            cfg,
            ws_port=cfg.relay.port,
            http_port=cfg.relay.http_port,
            stun_port=cfg.relay.stun_port if cfg.relay.stun else 0,
        )
        assert addr.public
        # Clients: the public host, and published ports that lead to the listening ones.
        for url, proto, target in (
            (addr.client_ws_url, "tcp", cfg.relay.port),
            (addr.client_http_url, "tcp", cfg.relay.http_port),
            (f"stun://{addr.client_stun}", "udp", cfg.relay.stun_port),
        ):
            u = urlsplit(url)
            assert u.hostname == want_host, url
            assert published.get((u.port, proto)) == target, (name, url, proto, published)
        # Relays, etcd and Prometheus: the service name and the container's ports.
        for url, port in ((addr.ws_url, cfg.relay.port), (addr.http_url, cfg.relay.http_port)):
            assert (urlsplit(url).hostname, urlsplit(url).port) == (name, port)
        for endpoint in cfg.mesh.etcd_endpoints:
            assert urlsplit(endpoint).hostname in ETCD
        records.append(
            RelayRecord(
                relay_id=name,
                region=cfg.relay.region,
                name=name,
                ws_url=addr.ws_url,
                http_url=addr.http_url,
                public_key=str(PrivateKey.generate().public),
                started_at=0.0,
                version="t",
                stun=addr.stun,
                public_ws_url=addr.client_ws_url,
                public_http_url=addr.client_http_url,
                public_stun=addr.client_stun,
            )
        )
    # The map the relays serve: the configured one, each relay at what it registered,
    # and the same ports in the file (what is listed for a relay that is down).
    map_files = {relay_config(services[n]).region_map.file for n in RELAYS}
    assert len(map_files) == 1
    map_file = map_files.pop()
    assert map_file is not None
    configured = load_region_map(map_file)
    for region_map, host in ((live_map(configured, records), want_host), (configured, None)):
        nodes = [n for r in region_map.regions for n in r.nodes]
        assert sorted(n.name for n in nodes) == sorted(RELAYS)
        for node in nodes:
            svc = services[node.name]
            cfg = relay_config(svc)
            published = {(p.published, p.protocol): p.target for p in map(parse_port, svc["ports"])}
            assert host is None or node.host == host
            assert published.get((node.ws_port, "tcp")) == cfg.relay.port, node
            assert published.get((node.http_port, "tcp")) == cfg.relay.http_port, node
            assert published.get((node.stun_port, "udp")) == cfg.relay.stun_port, node


def test_prometheus_scrapes_every_relay(tmp_path: Path) -> None:
    doc = compose_config(tmp_path / "repo")
    prom = doc["services"]["prometheus"]
    config = host_path(prom, "/etc/prometheus/prometheus.yml")
    assert config is not None and config.name == "prometheus.yml"
    assert host_path(prom, "/etc/prometheus/alerts.yml") is not None
    scrape = yaml.safe_load(config.read_text())
    assert scrape["rule_files"] == ["alerts.yml"]
    targets = {
        t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    want = set()
    for name in RELAYS:
        cfg = relay_config(doc["services"][name])
        want.add(f"{name}:{cfg.relay.http_port}")
    assert targets == want
    # Prometheus has no authentication: it is published on the host's loopback only.
    assert all(parse_port(p).host_ip == "127.0.0.1" for p in prom["ports"])


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not installed (Debian package prometheus; tests/run.sh installs it)"
        )
    out = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_exposes_what_the_relays_listen_on() -> None:
    text = (ROOT / "Dockerfile").read_text()
    expose = next(line for line in text.splitlines() if line.startswith("EXPOSE"))
    cfg = load_config(ROOT / "config" / "eu-1.toml")
    assert set(expose.split()[1:]) == {
        f"{cfg.relay.port}",
        f"{cfg.relay.http_port}",
        f"{cfg.relay.stun_port}/udp",
    }
