"""Node keys: text forms, key files, end-to-end sealing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from relay.protocol.keys import (
    BoxCache,
    KeyFileError,
    NodeKey,
    PrivateKey,
    Sealer,
    SealError,
    load_key_file,
    load_or_create_key_file,
    write_key_file,
)


def test_text_forms_round_trip() -> None:
    key = PrivateKey.generate()
    assert str(key.public).startswith("nodekey:") and len(str(key.public)) == 8 + 64
    assert NodeKey.parse(str(key.public)) == key.public
    assert PrivateKey.parse(key.to_text()).public == key.public
    assert "privkey" not in repr(key)
    assert key.public.short() == f"[{key.public.raw[:3].hex()}]"


@pytest.mark.parametrize(
    "text", ["", "nodekey:", "nodekey:zz" + "0" * 62, "privkey:" + "0" * 64, "nodekey:" + "0" * 63]
)
def test_bad_node_key_text(text: str) -> None:
    with pytest.raises(ValueError):
        NodeKey.parse(text)


def test_raw_lengths_are_checked() -> None:
    with pytest.raises(ValueError):
        NodeKey(b"short")
    with pytest.raises(ValueError):
        PrivateKey(b"short")


def test_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    key = PrivateKey.generate()
    write_key_file(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(path).public == key.public
    with pytest.raises(FileExistsError):
        write_key_file(path, PrivateKey.generate())


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_key_file(path, PrivateKey.generate())
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key_file(path)


def test_key_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"missing\.key"):
        load_key_file(tmp_path / "missing.key")
    bad = tmp_path / "bad.key"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"nonsense\n")
    os.close(fd)
    with pytest.raises(KeyFileError, match=r"bad\.key"):
        load_key_file(bad)


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "relay.key"
    first = load_or_create_key_file(path)
    assert load_or_create_key_file(path).public == first.public


def test_sealing_between_two_keys() -> None:
    alice, bob, eve = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    sealed = Sealer(alice).seal(bob.public, b"secret")
    assert b"secret" not in sealed
    assert Sealer(bob).open(alice.public, sealed) == b"secret"
    with pytest.raises(SealError):
        Sealer(eve).open(alice.public, sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealError):
        Sealer(bob).open(alice.public, tampered)
    with pytest.raises(SealError):
        Sealer(bob).open(alice.public, b"short")


def test_sealer_cache_is_bounded() -> None:
    me = PrivateKey.generate()
    sealer = Sealer(me, cache_size=2)
    peers = [PrivateKey.generate() for _ in range(3)]
    for p in peers:
        assert Sealer(p).open(me.public, sealer.seal(p.public, b"x")) == b"x"
    # The first peer was evicted and is rebuilt on demand.
    assert Sealer(peers[0]).open(me.public, sealer.seal(peers[0].public, b"y")) == b"y"
    assert Sealer(peers[0]).open(me.public, sealer.seal(peers[0].public, b"z")) == b"z"


def test_box_cache_keeps_the_last_used_boxes_only() -> None:
    me = PrivateKey.generate()
    a, b, c = (PrivateKey.generate().public for _ in range(3))
    cache = BoxCache(me, size=2)
    first = cache.get(a)
    cache.get(b)
    assert cache.get(a) is first  # reused, and now the most recently used
    cache.get(c)
    assert len(cache) == 2
    assert a in cache and c in cache and b not in cache
