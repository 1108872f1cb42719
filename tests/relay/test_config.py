"""Config loading: defaults, files, overrides, and errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from relay.config import ConfigError, load_config, load_tokens


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "relay.toml"
    p.write_text(text)
    return p


def test_defaults() -> None:
    cfg = load_config()
    assert cfg.relay.port == 3340 and cfg.admission.policy == "open"
    assert cfg.limits.send_queue_packets > 0


def test_file_with_relative_paths_and_overrides(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        '[relay]\nregion = "eu"\nkey_file = "eu.key"\n'
        '[admission]\npolicy = "token"\ntokens_file = "t.txt"\n',
    )
    cfg = load_config(p, overrides={"relay": {"name": "eu-2", "port": None}})
    assert cfg.relay.region == "eu" and cfg.relay.name == "eu-2"
    assert cfg.relay.key_file == tmp_path / "eu.key"
    assert cfg.admission.tokens_file == tmp_path / "t.txt"
    with pytest.raises(ValidationError):  # frozen
        cfg.relay.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[relay]\nprot = 1\n", r"relay\.toml: relay\.prot: unknown key"),
        ("[relay]\nport = 70000\n", r"relay\.toml: relay\.port: .*less than or equal to 65535"),
        (
            "[limits]\nsend_queue_packets = 0\n",
            r"limits\.send_queue_packets: .*greater than or equal to 1",
        ),
        ('[limits]\nwrite_timeout_s = "soon"\n', r"limits\.write_timeout_s: "),
        ('[admission]\npolicy = "token"\n', r"admission: .*needs tokens_file"),
        ('[admission]\npolicy = "maybe"\n', r"admission\.policy: "),
        ('[relay]\nregion = "EU West"\n', r"relay\.region: "),
        ("[bogus]\nx = 1\n", r"bogus: unknown key"),
        ("relay = 3\n", r"relay: "),
        ("[relay\n", r"relay\.toml: not valid TOML"),
    ],
)
def test_errors_name_file_key_and_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        load_config(tmp_path / "nope.toml")


def test_bad_override_names_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"command line: relay\.port"):
        load_config(overrides={"relay": {"port": -1}})


def test_tokens_file(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_text("# comment\n\nalpha\n beta \n")
    assert load_tokens(p) == {"alpha", "beta"}
    p.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="lists no token"):
        load_tokens(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_tokens(tmp_path / "missing")


def test_example_config_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "relay.example.toml"
    cfg = load_config(example)
    assert cfg.relay.region == "eu"


def _example_keys(text: str) -> dict[str, set[str]]:
    """``[section]`` → the keys shown under it, set or commented out (``# key = ...``)."""
    import re

    keys: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        header = re.match(r"^\[([a-z_]+)\]", line)
        if header:
            section = header.group(1)
            keys.setdefault(section, set())
            continue
        key = re.match(r"^#?\s*([a-z_][a-z0-9_]*)\s*=", line)
        if key and section:
            keys[section].add(key.group(1))
    return keys


def test_example_config_lists_every_key() -> None:
    from relay.config import RelayConfig

    example = Path(__file__).resolve().parents[2] / "config" / "relay.example.toml"
    shown = _example_keys(example.read_text())
    for section, field in RelayConfig.model_fields.items():
        model = field.annotation
        assert model is not None and hasattr(model, "model_fields"), section
        missing = set(model.model_fields) - shown.get(section, set())
        assert not missing, f"relay.example.toml [{section}] lacks {sorted(missing)}"
    assert set(shown) == set(RelayConfig.model_fields)


def test_region_map_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        '[region_map]\nfile = "regions.toml"\nsigning_key_file = "sign.key"\n'
        '[mesh]\nmesh_key_file = "mesh.key"\n',
    )
    cfg = load_config(p)
    assert cfg.region_map.file == tmp_path / "regions.toml"
    assert cfg.region_map.signing_key_file == tmp_path / "sign.key"
    assert cfg.mesh.mesh_key_file == tmp_path / "mesh.key"


def test_public_address_is_optional_and_checked(tmp_path: Path) -> None:
    assert not load_config().public.configured
    cfg = load_config(write(tmp_path, '[public]\nhost = "relay.example.com"\nws_port = 443\n'))
    assert cfg.public.configured and cfg.public.host == "relay.example.com"
    with pytest.raises(ConfigError, match=r"public\.stun_port: "):
        load_config(write(tmp_path, "[public]\nstun_port = 0\n"))
