"""A C-speed WebSocket masker for wsproto.

Every client-to-server WebSocket frame is XOR-masked (RFC 6455 §5.3).
wsproto's pure-Python masker costs ~70 µs per 64 KiB message here, which at
relay rates is more than parsing and routing the packets inside it. The
``websockets`` package ships the same operation in C (``apply_mask``, ~1.3 µs
per 64 KiB); :func:`install` puts a masker built on it where wsproto looks
for its own, keeping wsproto's contract: ``process`` may be called on
consecutive pieces of one frame, and the key continues where the last piece
stopped. trio-websocket and wsproto are otherwise untouched.

docs/performance.md has the measurements.
"""

from __future__ import annotations

from websockets.speedups import apply_mask
from wsproto import frame_protocol

__all__ = ["FastXorMasker", "install"]


class FastXorMasker:
    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytearray:
        if not data:
            return bytearray(data)
        out = bytearray(apply_mask(data, self._key))
        rotation = len(data) % 4
        if rotation:
            self._key = self._key[rotation:] + self._key[:rotation]
        return out


_original = frame_protocol.XorMaskerSimple


def install() -> None:
    """Make wsproto mask and unmask with :class:`FastXorMasker` (idempotent)."""
    frame_protocol.XorMaskerSimple = FastXorMasker  # type: ignore[misc,assignment]


def original_masker() -> type:
    """wsproto's own masker, for tests that compare the two."""
    return _original
