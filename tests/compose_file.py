"""docker-compose.yml as `docker-compose config` resolves it, for the deployment tests.

tests/test_deploy.py checks it against the relay configs; the lab test
(tests/lab/test_compose_topology.py) runs its services in network namespaces.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.config import RelayConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
RELAYS = [f"{r}-{n}" for r in ("eu", "us", "ap") for n in (1, 2)]
ETCD = ["etcd1", "etcd2", "etcd3"]
SECRETS = {"mesh_key": "config/mesh.key", "relay_tokens": "config/relay_tokens.txt"}


@dataclass(frozen=True)
class Port:
    published: int
    target: int
    protocol: str  # "tcp" or "udp"
    host_ip: str | None = None


def parse_port(spec: Any) -> Port:
    """A service's port, in the long form or the short "[ip:]published:target[/proto]"."""
    if isinstance(spec, dict):
        return Port(
            int(spec["published"]),
            int(spec["target"]),
            spec.get("protocol", "tcp"),
            spec.get("host_ip"),
        )
    m = re.fullmatch(r"(?:(?P<ip>[\d.]+):)?(?P<pub>\d+):(?P<tgt>\d+)(?:/(?P<proto>tcp|udp))?", spec)
    assert m, f"unexpected port form {spec!r}"
    return Port(int(m["pub"]), int(m["tgt"]), m["proto"] or "tcp", m["ip"])


def compose_config(workdir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The resolved compose file, from a copy of the repo's files with throwaway secrets."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip(
            "docker-compose is not installed (Debian package docker-compose;"
            " tests/run.sh installs it as root)"
        )
    import os

    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    for d in ("config", "deploy"):
        shutil.copytree(ROOT / d, workdir / d, dirs_exist_ok=True)
    shutil.copy(ROOT / "docker-compose.yml", workdir / "docker-compose.yml")
    (workdir / SECRETS["mesh_key"]).write_text("compose-test-mesh-key-0123456789\n")
    (workdir / SECRETS["relay_tokens"]).write_text("compose-test-token\n")
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYMESH_")}
    run_env.update(env or {})
    out = subprocess.run(
        [compose, "config"], cwd=workdir, capture_output=True, text=True, env=run_env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = yaml.safe_load(out.stdout)
    return doc


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """Where a container path of a service lives on the host (its bind mounts)."""
    for vol in service.get("volumes", []):
        src, dst = vol.split(":")[:2]
        if src.startswith("/") and (container_path == dst or container_path.startswith(dst + "/")):
            return Path(src + container_path[len(dst) :])
    return None


def relay_command(service: dict[str, Any]) -> Any:
    """The service's command, parsed by `relaymesh relay`'s own argument parser."""
    from relaymesh.cli import build_parser

    command = service["command"]
    assert command[0] == "relay", command
    return build_parser().parse_args(command)


def relay_config(service: dict[str, Any]) -> RelayConfig:
    """The relay's config as the container reads it: the mounted file, the command's flags."""
    args = relay_command(service)
    # Only these two flags are read here; any other would need its override too.
    flags = ["region", "name", "listen_host", "port", "http_port", "stun_port", "key_file"]
    flags += ["etcd", "mesh_key_file", "advertise_host"]
    given = {k for k in flags if getattr(args, k) is not None}
    assert not given, f"the compose command sets {sorted(given)}: read them from the config"
    path = host_path(service, str(args.config))
    assert path is not None, f"{args.config} is not mounted"
    return load_config(path, overrides={"public": {"host": args.public_host}})
