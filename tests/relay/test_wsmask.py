"""The C masker gives the bytes wsproto's own masker gives, however a frame is split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from wsproto import frame_protocol

from relay import _wsmask


def test_installed_in_wsproto() -> None:
    assert frame_protocol.XorMaskerSimple is _wsmask.FastXorMasker


@given(
    st.binary(min_size=4, max_size=4),
    st.binary(max_size=3000),
    st.lists(st.integers(min_value=0, max_value=700), max_size=8),
)
def test_same_bytes_as_wsproto_for_any_split(key: bytes, data: bytes, cuts: list[int]) -> None:
    original = _wsmask.original_masker()(key)
    fast = _wsmask.FastXorMasker(key)
    pos = 0
    for cut in [*cuts, len(data)]:
        piece = data[pos : pos + cut] if cut else b""
        assert bytes(fast.process(piece)) == bytes(original.process(bytearray(piece)))
        pos += len(piece)
    rest = data[pos:]
    assert bytes(fast.process(rest)) == bytes(original.process(bytearray(rest)))
