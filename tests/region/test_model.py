"""The region map: good maps load, each kind of bad one is named precisely."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from coordinator.registry import RelayRecord
from region.live import etag, live_map, sign, verify
from region.model import RegionMap, RegionMapError, load_region_map, parse_region_map
from relay.protocol.keys import PrivateKey

ROOT = Path(__file__).resolve().parents[2]


def good() -> dict[str, Any]:
    return {
        "regions": [
            {
                "id": 1,
                "code": "eu",
                "name": "Europe",
                "nodes": [
                    {"name": "eu-1", "host": "eu1.example", "ws_port": 443, "http_port": 80},
                    {
                        "name": "eu-2",
                        "host": "2001:db8::2",
                        "ws_port": 443,
                        "http_port": 80,
                        "stun_port": 0,
                        "ipv6": "2001:db8::2",
                    },
                ],
            },
            {
                "id": 2,
                "code": "us",
                "name": "North America",
                "nodes": [
                    {
                        "name": "us-1",
                        "host": "us1.example",
                        "ws_port": 443,
                        "http_port": 80,
                        "ipv4": "192.0.2.10",
                    },
                ],
            },
        ]
    }


def test_good_map_and_urls() -> None:
    m = parse_region_map(good())
    region, node = m.node("eu-2") or (None, None)
    assert region is not None and region.code == "eu"
    assert node is not None and node.ws_url == "ws://[2001:db8::2]:443/derp"
    assert node.stun_address() is None
    _, us1 = m.node("us-1") or (None, None)
    assert us1 is not None and us1.stun_address() == ("192.0.2.10", 3478)
    assert m.region("us") is not None and m.region("ap") is None
    assert RegionMap.model_validate_json(m.to_json()) == m


def mutate(path: str, value: Any) -> dict[str, Any]:
    raw = good()
    target: Any = raw
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "regions.0.nodes.1.ws_port",
            0,
            r'region "eu" \(regions\[0\]\): node "eu-2" \(nodes\[1\]\): ws_port: ',
        ),
        (
            "regions.1.nodes.0.host",
            "",
            r'region "us" \(regions\[1\]\): node "us-1" \(nodes\[0\]\): host: ',
        ),
        ("regions.0.nodes.0.ipv4", "not-an-ip", r'node "eu-1" \(nodes\[0\]\): ipv4: '),
        ("regions.0.nodes.0.public_key", "nodekey:zz", r'node "eu-1" \(nodes\[0\]\): public_key: '),
        ("regions.0.nodes.0.color", "red", r'node "eu-1" \(nodes\[0\]\): color: unknown key'),
        ("regions.1.code", "US", r'region "US" \(regions\[1\]\): code: '),
        ("regions.1.id", 1, r"region ids repeat across the map: 1"),
        ("regions.1.code", "eu", r"region codes repeat across the map: eu"),
        ("regions.1.nodes.0.name", "eu-1", r"node names repeat across the map: eu-1"),
        (
            "regions.0.nodes.1.name",
            "eu-1",
            r'region "eu" \(regions\[0\]\): node names repeat: eu-1',
        ),
        ("regions.0.nodes", [], r'region "eu" \(regions\[0\]\): nodes: '),
        ("regions.0.name", KeyError, r'region "eu" \(regions\[0\]\): name: '),
        ("regions", [], r"regions: "),
    ],
)
def test_bad_maps_name_region_node_and_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(RegionMapError, match=message):
        parse_region_map(mutate(path, value), source="map.json")


def test_example_config_matches_compose_ports() -> None:
    m = load_region_map(ROOT / "config" / "regions.toml")
    nodes = [n for r in m.regions for n in r.nodes]
    assert [n.name for n in nodes] == ["eu-1", "eu-2", "us-1", "us-2", "ap-1", "ap-2"]
    assert [n.ws_port for n in nodes] == [3340 + 2 * i for i in range(6)]


def test_bad_file_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "regions.toml"
    p.write_text("[[regions]]\nid = 0\n")
    with pytest.raises(RegionMapError, match=r"regions\.toml: region regions\[0\]: id: "):
        load_region_map(p)


def test_published_schema_is_current() -> None:
    published = json.loads((ROOT / "docs" / "regionmap.schema.json").read_text())
    assert published == RegionMap.model_json_schema()


def record(name: str, region: str, key: str) -> RelayRecord:
    return RelayRecord(
        relay_id=name,
        region=region,
        name=name,
        ws_url=f"ws://{name}:3340/derp",
        http_url=f"http://{name}:3341",
        public_key=key,
        started_at=0.0,
        version="t",
        stun=f"{name}:3478",
    )


def test_live_map_marks_down_nodes_and_fills_keys() -> None:
    key = str(PrivateKey.generate().public)
    m = live_map(parse_region_map(good()), [record("eu-1", "eu", key)])
    _, eu1 = m.node("eu-1") or (None, None)
    _, us1 = m.node("us-1") or (None, None)
    assert eu1 is not None and eu1.up and eu1.public_key == key
    assert us1 is not None and not us1.up and us1.public_key is None


def test_live_map_from_registry_alone() -> None:
    keys = [str(PrivateKey.generate().public) for _ in range(3)]
    m = live_map(
        None,
        [
            record("us-1", "us", keys[0]),
            record("eu-2", "eu", keys[1]),
            record("eu-1", "eu", keys[2]),
        ],
    )
    assert [(r.id, r.code, [n.name for n in r.nodes]) for r in m.regions] == [
        (1, "eu", ["eu-1", "eu-2"]),
        (2, "us", ["us-1"]),
    ]
    _, n = m.node("us-1") or (None, None)
    assert n is not None and (n.host, n.ws_port, n.http_port, n.stun_port) == (
        "us-1",
        3340,
        3341,
        3478,
    )


def test_live_map_lists_a_registered_public_address() -> None:
    from dataclasses import replace

    key = str(PrivateKey.generate().public)
    published = replace(
        record("eu-1", "eu", key),
        public_ws_url="ws://203.0.113.7:3342/derp",
        public_http_url="http://203.0.113.7:3343",
        public_stun="203.0.113.7:3479",
    )
    for configured in (parse_region_map(good()), None):
        _, n = live_map(configured, [published]).node("eu-1") or (None, None)
        assert n is not None and n.up
        assert (n.host, n.ws_port, n.http_port, n.stun_port) == ("203.0.113.7", 3342, 3343, 3479)
        assert n.ws_url == "ws://203.0.113.7:3342/derp"
    # Without a public address the configured one stands, and a node that is down keeps it.
    m = live_map(parse_region_map(good()), [record("eu-1", "eu", key)])
    _, n = m.node("eu-1") or (None, None)
    assert n is not None and (n.host, n.ws_port) == ("eu1.example", 443)


def test_with_public_host_drops_stale_address_hints() -> None:
    _, n = parse_region_map(good()).node("eu-2") or (None, None)
    assert n is not None
    moved = n.with_public_host("ws://relay.example:443/derp", None, None)
    assert (moved.host, moved.ws_port, moved.http_port, moved.stun_port) == (
        "relay.example",
        443,
        443,
        0,
    )
    assert moved.ipv4 is None and moved.ipv6 is None and not moved.tls
    secure = n.with_public_host("wss://relay.example/derp", "https://relay.example", None)
    assert (secure.ws_port, secure.http_port, secure.tls) == (443, 443, True)
    assert secure.ws_url == "wss://relay.example:443/derp"
    same = n.with_public_host(f"ws://[{n.host}]:1/derp", f"http://[{n.host}]:2", "x:3")
    assert (same.ws_port, same.http_port, same.stun_port) == (1, 2, 3)
    assert same.ipv6 == n.ipv6


def test_etag_and_signature() -> None:
    import nacl.signing

    body = parse_region_map(good()).to_json()
    assert etag(body) == etag(body) and etag(body) != etag(body + b" ")
    key = nacl.signing.SigningKey.generate()
    sig = sign(body, key)
    assert verify(body, sig, key.verify_key)
    assert not verify(body + b"x", sig, key.verify_key)
    assert not verify(body, None, key.verify_key)
    assert not verify(body, sig, nacl.signing.SigningKey.generate().verify_key)
    assert not verify(body, "ed25519:zz", key.verify_key)
