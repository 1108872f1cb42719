"""Node keys and end-to-end sealing.

Every client and every relay owns a Curve25519 key pair (pynacl). Public keys
have a text form ``nodekey:<64 hex>``; private keys ``privkey:<64 hex>``, which
is also what a key file holds (one line, written mode 0600).

Payloads between clients are sealed with a NaCl box between the sender's
private key and the recipient's public key, so a relay only ever carries
sealed bytes. A box needs one Curve25519 scalar multiplication to set up;
:class:`Sealer` keeps the boxes of recent peers so the hot path does not.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.public
import nacl.utils

__all__ = [
    "KEY_BYTES",
    "BoxCache",
    "KeyFileError",
    "NodeKey",
    "PrivateKey",
    "SealError",
    "Sealer",
    "load_key_file",
    "load_or_create_key_file",
    "write_key_file",
]

KEY_BYTES = 32
_PUBLIC_PREFIX = "nodekey:"
_PRIVATE_PREFIX = "privkey:"


class KeyFileError(Exception):
    """A key file is missing, malformed or too widely readable."""


class SealError(Exception):
    """A sealed payload did not open: wrong key, truncated or forged."""


def _parse_hex(text: str, prefix: str, what: str) -> bytes:
    text = text.strip()
    if not text.startswith(prefix):
        raise ValueError(f"{what} must start with {prefix!r}")
    body = text[len(prefix) :]
    if len(body) != 2 * KEY_BYTES:
        raise ValueError(f"{what} must have {2 * KEY_BYTES} hex digits after {prefix!r}")
    try:
        return bytes.fromhex(body)
    except ValueError:
        raise ValueError(f"{what} is not hexadecimal") from None


@dataclass(frozen=True, slots=True)
class NodeKey:
    """A public key: identifies a client (or a relay) everywhere in the mesh."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_BYTES:
            raise ValueError(f"a node key is {KEY_BYTES} bytes, got {len(self.raw)}")

    @classmethod
    def parse(cls, text: str) -> NodeKey:
        return cls(_parse_hex(text, _PUBLIC_PREFIX, "a node key"))

    def __str__(self) -> str:
        return _PUBLIC_PREFIX + self.raw.hex()

    def short(self) -> str:
        """An abbreviation for logs and tables: ``[ab12cd]``."""
        return f"[{self.raw[:3].hex()}]"


class PrivateKey:
    """A Curve25519 private key with its public half."""

    __slots__ = ("_nacl", "public")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_BYTES:
            raise ValueError(f"a private key is {KEY_BYTES} bytes, got {len(raw)}")
        self._nacl = nacl.public.PrivateKey(raw)
        self.public = NodeKey(bytes(self._nacl.public_key))

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(nacl.utils.random(KEY_BYTES))

    @classmethod
    def parse(cls, text: str) -> PrivateKey:
        return cls(_parse_hex(text, _PRIVATE_PREFIX, "a private key"))

    def to_text(self) -> str:
        return _PRIVATE_PREFIX + bytes(self._nacl).hex()

    def box(self, peer: NodeKey) -> nacl.public.Box:
        """The NaCl box between this key and ``peer`` (symmetric: both ends get the same)."""
        return nacl.public.Box(self._nacl, nacl.public.PublicKey(peer.raw))

    def __repr__(self) -> str:
        # Never the secret, even in a traceback.
        return f"PrivateKey(public={self.public})"


class BoxCache:
    """The NaCl boxes between one private key and its peers, the last ``size`` used kept.

    Setting a box up costs a scalar multiplication (tens of microseconds) and a
    conversation reuses its box, so :class:`Sealer` (end-to-end payloads) and
    the disco codec (disco.py) both keep theirs here.
    """

    def __init__(self, key: PrivateKey, *, size: int) -> None:
        self._key = key
        self._size = size
        self._boxes: OrderedDict[NodeKey, nacl.public.Box] = OrderedDict()

    def get(self, peer: NodeKey) -> nacl.public.Box:
        box = self._boxes.get(peer)
        if box is None:
            box = self._key.box(peer)
            self._boxes[peer] = box
            if len(self._boxes) > self._size:
                self._boxes.popitem(last=False)
        else:
            self._boxes.move_to_end(peer)
        return box

    def __contains__(self, peer: NodeKey) -> bool:
        return peer in self._boxes

    def __len__(self) -> int:
        return len(self._boxes)


class Sealer:
    """Seals and opens payloads between one private key and many peers.

    Keeps the boxes of the last ``cache_size`` peers (:class:`BoxCache`).
    """

    def __init__(self, key: PrivateKey, *, cache_size: int = 1024) -> None:
        self._boxes = BoxCache(key, size=cache_size)

    def seal(self, peer: NodeKey, payload: bytes) -> bytes:
        """Nonce (24 bytes) + ciphertext; only ``peer`` can open it."""
        return bytes(self._boxes.get(peer).encrypt(payload))

    def open(self, peer: NodeKey, sealed: bytes) -> bytes:
        try:
            return bytes(self._boxes.get(peer).decrypt(sealed))
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise SealError(f"payload from {peer.short()} did not open") from exc


def write_key_file(path: Path, key: PrivateKey) -> None:
    """Write ``key`` to a new file that only its owner can read.

    The file is created with mode 0600 from the start (never written wide and
    narrowed later) and an existing file is never overwritten.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.to_text() + "\n")


def load_key_file(path: Path) -> PrivateKey:
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: key file is readable by others (mode {stat.S_IMODE(st.st_mode):04o});"
            f" run: chmod 600 {path}"
        )
    try:
        return PrivateKey.parse(text)
    except ValueError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def load_or_create_key_file(path: Path) -> PrivateKey:
    """The key in ``path``, generating and saving a new one if the file does not exist."""
    if not path.exists():
        key = PrivateKey.generate()
        try:
            write_key_file(path, key)
        except FileExistsError:
            pass  # someone else won the race: use theirs
        else:
            return key
    return load_key_file(path)
