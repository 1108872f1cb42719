"""A relay's mesh address (relays, monitor, Prometheus) and client address ([public])."""

from __future__ import annotations

from relay.addresses import relay_addresses
from relay.config import load_config


def test_without_public_config_clients_use_the_mesh_address() -> None:
    cfg = load_config(overrides={"relay": {"listen_host": "0.0.0.0"}})
    a = relay_addresses(cfg, ws_port=3340, http_port=3341, stun_port=3478)
    assert (a.ws_url, a.http_url, a.stun) == (
        "ws://127.0.0.1:3340/derp",
        "http://127.0.0.1:3341",
        "127.0.0.1:3478",
    )
    assert (a.client_ws_url, a.client_http_url, a.client_stun) == (a.ws_url, a.http_url, a.stun)
    assert not a.public


def test_public_host_and_published_ports_are_for_clients_only() -> None:
    cfg = load_config(
        overrides={
            "mesh": {"advertise_host": "eu-2"},
            "public": {"host": "203.0.113.7", "ws_port": 3342, "stun_port": 3479},
        }
    )
    a = relay_addresses(cfg, ws_port=3340, http_port=3341, stun_port=3478)
    assert (a.ws_url, a.http_url, a.stun) == (
        "ws://eu-2:3340/derp",
        "http://eu-2:3341",
        "eu-2:3478",
    )
    assert (a.client_ws_url, a.client_http_url, a.client_stun) == (
        "ws://203.0.113.7:3342/derp",
        "http://203.0.113.7:3341",  # no published HTTP port given: the listening one
        "203.0.113.7:3479",
    )
    assert a.public


def test_stun_off_and_ipv6_hosts() -> None:
    cfg = load_config(overrides={"relay": {"stun": False}, "public": {"host": "2001:db8::1"}})
    a = relay_addresses(cfg, ws_port=1, http_port=2, stun_port=0)
    assert a.stun is None and a.client_stun is None
    assert a.client_ws_url == "ws://[2001:db8::1]:1/derp"


def test_tls_makes_both_addresses_wss_and_https() -> None:
    cfg = load_config(overrides={"public": {"host": "relay.example.com", "ws_port": 443}})
    a = relay_addresses(cfg, ws_port=3340, http_port=3341, stun_port=3478, tls=True)
    assert (a.ws_url, a.http_url) == ("wss://127.0.0.1:3340/derp", "https://127.0.0.1:3341")
    assert (a.client_ws_url, a.client_http_url) == (
        "wss://relay.example.com:443/derp",
        "https://relay.example.com:3341",
    )
