"""The per-peer path state machine, driven by a fake clock."""

from __future__ import annotations

from relay.protocol.keys import PrivateKey
from relaymesh.paths import PathConfig, PeerPath

A = ("192.0.2.1", 1000)
B = ("198.51.100.2", 2000)


def path() -> PeerPath:
    p = PeerPath(PrivateKey.generate().public, PathConfig())
    p.learn(PrivateKey.generate().public, [A, B, ("0.0.0.0", 5)], 0.0)
    return p


def pings(actions: list) -> list:  # type: ignore[type-arg]
    return [a for a in actions if a.kind == "ping"]


def test_relayed_until_a_pong_then_direct() -> None:
    p = path()
    assert list(p.candidates) == [A, B]  # unspecified addresses are not candidates
    p.want_discovery(0.0)
    first = p.due(0.0)
    assert [a.kind for a in first] == ["call_me_maybe", "ping", "ping"]
    assert p.direct_addr(0.01) is None  # nothing confirmed: data stays on the relay
    assert p.due(0.5) == []  # no rediscovery before retry_s
    ping_b = next(a for a in first if a.addr == B)
    assert p.on_pong(ping_b.txid, 0.02)
    assert p.direct_addr(0.03) == B and p.upgrades == 1
    assert not p.on_pong(b"unknown txid", 0.03)


def test_lowest_rtt_wins_only_with_a_clear_gain() -> None:
    p = path()
    p.want_discovery(0.0)
    acts = {a.addr: a for a in pings(p.due(0.0))}
    p.on_pong(acts[A].txid, 0.050)  # 50 ms: first confirmed path
    p.on_pong(acts[B].txid, 0.045)  # 45 ms: not clearly better
    assert p.best == A
    again = p.ping_from_peer(B, 1.0)
    assert again == []  # a confirmed path exists: no ping back
    p.best = A
    p.pending[b"x" * 12] = (B, 1.0)
    p.on_pong(b"x" * 12, 1.010)  # 10 ms vs 50: clearly better
    assert p.best == B


def test_idle_heartbeat_and_trust() -> None:
    p = path()
    p.want_discovery(0.0)
    ping_a = next(a for a in pings(p.due(0.0)) if a.addr == A)
    p.on_pong(ping_a.txid, 0.01)
    beat = pings(p.due(0.02))
    assert [a.addr for a in beat] == [A]  # first heartbeat
    assert pings(p.due(1.0)) == []  # idle: every 3 s
    assert [a.addr for a in pings(p.due(3.1))] == [A]
    # No pong for longer than trust_s (6.5 s) while idle: back to the relay.
    assert p.direct_addr(6.0) == A
    assert p.direct_addr(6.6) is None
    p.due(6.6)
    assert p.best is None and p.fallbacks == 1


def test_active_path_falls_back_fast_and_counts_what_it_lost() -> None:
    p = path()
    p.want_discovery(0.0)
    ping_a = next(a for a in pings(p.due(0.0)) if a.addr == A)
    p.on_pong(ping_a.txid, 0.01)
    t = 0.02
    while t < 1.0:  # data flows; pongs stop (the path was cut at 0.01)
        p.sent_direct(t)
        p.due(t)
        t += 0.01
    assert p.best is None and p.fallbacks == 1
    # Only what went into the dead path before the silence limit counts.
    assert 50 <= p.lost_in_cuts <= 62
    assert p.direct_addr(t) is None


def test_peer_ping_is_answered_with_our_own_ping_back() -> None:
    p = PeerPath(PrivateKey.generate().public)
    acts = p.ping_from_peer(B, 0.0)
    assert [a.addr for a in acts] == [B] and B in p.candidates
    assert p.ping_from_peer(B, 0.001) == []  # not twice within 5 ms
    assert [a.addr for a in p.ping_from_peer(B, 0.01)] == [B]


def test_candidates_are_bounded() -> None:
    p = PeerPath(PrivateKey.generate().public, PathConfig(max_candidates=3))
    p.learn(None, [(f"192.0.2.{i}", i + 1) for i in range(10)], 0.0)
    assert len(p.candidates) == 3
