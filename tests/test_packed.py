"""The struct layouts behind the boot formats: sizes, byte order, defaults, nesting,
and what they refuse."""

from __future__ import annotations

import struct

import pytest

from avmm._packed import Packed

PAIR = Packed(("low", "H"), ("", "2x"), ("high", "I"))
OUTER = Packed(
    ("magic", "4s", b"TEST"),
    ("pair", PAIR),
    ("entries", PAIR, 3),
    ("tail", "Q"),
)


def test_layout_is_packed_little_endian() -> None:
    assert PAIR.size == 8 and OUTER.size == 4 + 8 + 3 * 8 + 8
    data = PAIR.build(low=0x0102, high=0x03040506)
    assert data == bytes([0x02, 0x01, 0, 0, 0x06, 0x05, 0x04, 0x03])
    assert PAIR.names == ("low", "high")


def test_defaults_nesting_and_arrays() -> None:
    data = OUTER.build({"pair": {"high": 7}, "entries": [{"low": 1}, {"low": 2}]}, tail=9)
    assert data[:4] == b"TEST"
    assert struct.unpack_from("<HxxI", data, 4) == (0, 7)
    assert [struct.unpack_from("<H", data, 12 + 8 * i)[0] for i in range(3)] == [1, 2, 0]
    assert struct.unpack_from("<Q", data, 36)[0] == 9
    parsed = OUTER.parse(b"junk" + data, 4)
    assert parsed.magic == b"TEST" and parsed["tail"] == 9
    assert parsed.pair.high == 7 and [item.low for item in parsed.entries] == [1, 2, 0]
    with pytest.raises(AttributeError):
        parsed.nothing  # noqa: B018


def test_refusals() -> None:
    with pytest.raises(ValueError, match="magic: 3 bytes for a 4-byte field"):
        OUTER.build(magic=b"abc")
    with pytest.raises(ValueError, match="entries: 4 items for 3 slots"):
        OUTER.build(entries=[{}] * 4)
    with pytest.raises(struct.error):
        PAIR.build(low=0x10000)
    with pytest.raises(struct.error):
        PAIR.parse(bytes(7))
    with pytest.raises(ValueError, match="would hide a dict method"):
        Packed(("items", "B"))
