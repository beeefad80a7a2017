"""The reader's fast pass (no paths, one-byte varints inline) accepts exactly what its
checked pass accepts, and reads the same values; what it refuses, the checked pass reads
again to name what is wrong. Damaged encodings, the limits (depth, items, values), and
whole state file payloads."""

from __future__ import annotations

import random
from typing import Any

import pytest

from avmm.state import SnapshotError, _reader
from avmm.state._reader import MAX_DEPTH, MAX_ITEMS, _read_checked, _read_fast, read_values
from avmm.state.codec import encode
from avmm.state.format import HEADER, build_state

from .samples import machine_state, platform_state
from .test_codec import SAMPLE


def _checked(data: bytes, prefixed: bool, sections: Any) -> object:
    try:
        return ("read", _read_checked(data, prefixed, "value", sections))
    except SnapshotError as e:
        return ("refused", str(e))


def _fast(data: bytes, prefixed: bool, sections: Any) -> object:
    try:
        return ("read", _read_fast(data, prefixed, sections))
    except Exception:
        return ("refused", None)


def _agree(data: bytes, prefixed: bool = False, sections: Any = None) -> str:
    checked = _checked(data, prefixed, sections)
    fast = _fast(data, prefixed, sections)
    assert fast[0] == checked[0], data
    if checked[0] == "read":
        assert fast == checked
    else:  # read_values gives the checked pass's message
        with pytest.raises(SnapshotError) as caught:
            read_values(data, prefixed, "value", sections=sections)
        assert str(caught.value) == checked[1]
    return str(checked[0])


def _payload() -> bytes:
    data = build_state({"machine": machine_state(2), "platform": platform_state()})
    header = HEADER.parse(data)
    start = len(HEADER.build(header))
    return data[start:start + header.payload_length]


def test_damaged_values_are_read_or_refused_alike() -> None:
    rng = random.Random(3)
    outcomes: set[str] = set()
    for good in (encode(SAMPLE), encode(machine_state(1))):
        assert _agree(good) == "read"
        for _ in range(400):
            data = bytearray(good)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.choice([0, 1, 2, 5, 7, 8, 0x7F, 0x80,
                                                             0xFF, rng.randrange(256)])
            cut = rng.choice([len(data), len(data), rng.randrange(len(data))])
            outcomes.add(_agree(bytes(data[:cut])))
    assert outcomes == {"read", "refused"}


def test_damaged_payloads_are_read_or_refused_alike() -> None:
    good = _payload()
    rng = random.Random(4)
    for sections in (None, ("machine", "platform"), ("machine",)):
        _agree(good, True, sections)
        for _ in range(150):
            data = bytearray(good)
            data[rng.randrange(len(data))] = rng.randrange(256)
            _agree(bytes(data), True, sections)
    # a section twice
    _agree(b"\x02" + good[1:] + good[1:], True, ("machine", "platform"))


def _leb(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


@pytest.mark.parametrize("data", [
    bytes([6, 1]) * (MAX_DEPTH + 1) + bytes([0]),  # too deep
    bytes([6, 1]) * MAX_DEPTH + bytes([0]),  # as deep as allowed
    bytes([6]) + _leb(MAX_ITEMS + 1) + bytes(MAX_ITEMS + 1),  # too many items
    bytes([6]) + _leb(MAX_ITEMS) + bytes(MAX_ITEMS),  # as many as allowed
    bytes([8, 2, 3, 2, 0, 3, 2, 0]),  # a key twice
    bytes([8, 1, 2, 0]),  # a boolean key
    bytes([8, 1, 4, 0, 0]),  # a bytes key
    bytes([7, 1, 0x41, 0, 2, 1, 0x78, 0, 1, 0x78, 0]),  # a field twice
    bytes([3, 0x80, 0x80, 0x00]),  # not the shortest form
    bytes([3]) + b"\xff" * 9 + b"\x01",  # ten bytes: the longest
    bytes([3]) + b"\xff" * 10 + b"\x01",  # eleven
    bytes([5, 2, 0xC3, 0xA9]), bytes([5, 2, 0xFF, 0xFE]), bytes([4, 3, 1, 2]),
    bytes([9]), b"", bytes([0, 0]),
])
def test_the_limits_and_rules_are_the_same(data: bytes) -> None:
    _agree(data)


def test_too_many_values_in_all_is_refused_by_both(monkeypatch) -> None:
    monkeypatch.setattr(_reader, "MAX_VALUES", 50)
    assert _agree(bytes([6, 49]) + bytes(49)) == "read"
    assert _agree(bytes([6, 50]) + bytes(50)) == "refused"
    assert _agree(bytes([6, 2, 6, 30]) + bytes(30) + bytes([6, 30]) + bytes(30)) == "refused"
