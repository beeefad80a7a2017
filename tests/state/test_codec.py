"""The state encoding: every kind of field round-trips, and anything that does not fit
the declared dataclass is one SnapshotError line naming the field."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from avmm.state import SnapshotError
from avmm.state.codec import (
    S64,
    U8,
    U16,
    U64,
    Record,
    build_value,
    decode,
    encode,
    to_plain,
    wire_of,
)


@dataclass(frozen=True)
class Point:
    x: U16
    y: S64


@dataclass(frozen=True)
class Sample:
    STATE_VERSION: ClassVar[int] = 3

    count: int
    width: U8
    big: U64
    blob: bytes
    name: str
    enabled: bool
    points: list[Point]
    nested: list[list[int]]
    maybe: Point | None
    absent: bytes | None
    table: dict[str, U16]
    by_id: dict[int, Point]


SAMPLE = Sample(
    count=-12345678901234, width=255, big=(1 << 64) - 1, blob=bytes(range(256)) * 3,
    name="vcpu0 é", enabled=False, points=[Point(0, -(1 << 63)), Point(65535, (1 << 63) - 1)],
    nested=[[], [1, 2, 3]], maybe=Point(7, -7), absent=None, table={"a": 1, "": 0},
    by_id={0: Point(1, 1), -5: Point(2, 2)},
)


def test_every_kind_of_field_round_trips():
    data = encode(SAMPLE)
    assert decode(data, Sample) == SAMPLE


def test_the_encoding_is_deterministic():
    assert encode(SAMPLE) == encode(Sample(**SAMPLE.__dict__))


def _record(**changes: Any) -> bytes:
    """SAMPLE's plain form with ``changes`` applied to its fields, encoded."""
    plain = to_plain(SAMPLE)
    fields = dict(plain.fields)
    for name, value in changes.items():
        if value is _DELETE:
            del fields[name]
        else:
            fields[name] = value
    return build_value(Record(plain.name, plain.version, fields))


_DELETE = object()


@pytest.mark.parametrize(("changes", "message"), [
    ({"surplus": 1},
     "Sample: unknown field 'surplus' in Sample (written by a newer avmm?)"),
    ({"width": _DELETE}, "Sample: Sample lacks field 'width'"),
    ({"width": 256}, "Sample.width: 256 does not fit in u8"),
    ({"width": -1}, "Sample.width: -1 does not fit in u8"),
    ({"count": 1 << 64}, "Sample.count: 18446744073709551616 does not fit in a 64-bit integer"),
    ({"blob": "text"}, "Sample.blob: expected bytes, found a string"),
    ({"enabled": 1}, "Sample.enabled: expected a boolean, found an integer"),
    ({"count": True}, "Sample.count: expected an integer, found a boolean"),
    ({"points": [Record("Point", 1, {"x": 1, "y": b""})]},
     "Sample.points[0].y: expected an integer, found bytes"),
    ({"points": [Record("Other", 1, {"x": 1, "y": 2})]},
     "Sample.points[0]: expected a record of type Point, found one of type Other"),
    ({"maybe": 5}, "Sample.maybe: expected a record of type Point, found an integer"),
    ({"table": {"a": 1 << 20}}, "Sample.table['a']: 1048576 does not fit in u16"),
    ({"table": [1]}, "Sample.table: expected a map, found a list"),
    ({"by_id": {"0": Record("Point", 1, {"x": 1, "y": 1})}},
     "Sample.by_id{key}: expected an integer, found a string"),
    ({"absent": None, "name": None}, "Sample.name: expected a string, found nothing (none)"),
])
def test_a_value_that_does_not_fit_is_one_line_naming_it(changes, message):
    with pytest.raises(SnapshotError) as caught:
        decode(_record(**changes), Sample)
    assert str(caught.value) == message


def test_a_newer_version_is_refused_and_an_older_one_needs_an_upgrade():
    plain = to_plain(SAMPLE)
    newer = build_value(Record("Sample", 4, plain.fields))
    with pytest.raises(SnapshotError, match=r"^Sample: Sample is version 4 in the file; this "
                                            r"avmm reads version 3 \(written by a newer"):
        decode(newer, Sample)
    older = build_value(Record("Sample", 2, plain.fields))
    with pytest.raises(SnapshotError, match=r"^Sample: Sample is version 2 in the file"):
        decode(older, Sample)


@dataclass(frozen=True)
class Renamed:
    """Version 2 renamed ``old`` to ``new`` and doubled it."""

    STATE_VERSION: ClassVar[int] = 2

    new: int

    @classmethod
    def upgrade_state(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        assert version == 1
        return {"new": fields.pop("old") * 2, **fields}


def test_an_upgrade_hook_reads_an_older_version():
    old = build_value(Record("Renamed", 1, {"old": 21}))
    assert decode(old, Renamed) == Renamed(new=42)


def test_a_repeated_field_is_refused():
    from avmm.state.codec import VALUE

    wire = {"tag": "record", "value": {"name": "Point", "version": 1, "fields": [
        {"name": "x", "value": {"tag": "int", "value": 1}},
        {"name": "x", "value": {"tag": "int", "value": 2}},
        {"name": "y", "value": {"tag": "int", "value": 3}},
    ]}}
    with pytest.raises(SnapshotError, match=r"^Point: field 'x' appears twice$"):
        decode(VALUE.build(wire), Point)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "stream read less than specified amount"),
    (bytes([9]), "unknown value tag 9"),
    (bytes([3]) + b"\xff" * 11, "varint longer than 10 bytes"),
    (bytes([3, 0x80, 0x00]), "varint is not in its shortest form"),
    (bytes([5, 2, 0xFF, 0xFE]), "cannot use encoding 'utf8'"),
    (bytes([5, 0x80, 0x80, 0x04]) + b"\xff" * 65536, "cannot use encoding 'utf8'"),
    (encode(Point(1, 2)) + b"\x00", "expected end of stream"),
])
def test_malformed_bytes_are_one_line(data, reason):
    with pytest.raises(SnapshotError) as caught:
        decode(data, Point)
    message = str(caught.value)
    assert message.startswith("Point: malformed (") and reason in message
    assert "\n" not in message and len(message) < 300


def test_deep_nesting_is_refused_not_a_crash():
    data = bytes([6, 1]) * 100_000 + bytes([0])  # a list in a list in a list ...
    with pytest.raises(SnapshotError, match="nested too deeply"):
        decode(data, Point)


def test_random_damage_is_always_a_snapshot_error():
    """Whatever happens to the bytes, decoding either gives a Sample or one line."""
    good = encode(SAMPLE)
    rng = random.Random(12)
    for _ in range(500):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = rng.choice([len(data), rng.randrange(len(data))])
        try:
            decode(bytes(data[:cut]), Sample)
        except SnapshotError as e:
            assert "\n" not in str(e)


def test_encoding_refuses_what_the_declaration_does_not_allow():
    with pytest.raises(TypeError, match=r"Point\.x: 70000 does not fit in u16"):
        encode(Point(70000, 0))
    with pytest.raises(TypeError, match=r"Point\.y: expected an int, got str"):
        encode(Point(1, "2"))  # type: ignore[arg-type]


def _outcome(parse: Any, data: bytes) -> object:
    try:
        return parse(data)
    except SnapshotError:
        return "refused"


def test_the_reader_accepts_and_refuses_what_the_construct_declaration_does():
    """decode() reads with avmm.state._reader, not construct (ten times faster): on
    damaged encodings both must agree on what is valid and what it says."""
    from avmm.state._reader import read_values
    from avmm.state.codec import decode_with_construct

    from .samples import machine_state

    rng = random.Random(7)
    agreed_valid = 0
    for good in (encode(SAMPLE), encode(machine_state(1))):
        for _ in range(200):
            data = bytearray(good)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF,
                                                             rng.randrange(256)])
            data = bytes(data[:rng.choice([len(data), rng.randrange(len(data))])])
            expected = _outcome(decode_with_construct, data)
            assert _outcome(lambda d: read_values(d, False, "value"), data) == expected, data
            agreed_valid += expected != "refused"
    assert agreed_valid > 10  # the comparison covered accepted inputs too


def test_the_reader_reads_state_file_sections_as_construct_declares_them():
    from avmm.state._reader import read_values
    from avmm.state.codec import plain_of
    from avmm.state.format import PAYLOAD

    from .samples import machine_state, platform_state

    payload = PAYLOAD.build({"sections": [
        {"name": "machine", "value": wire_of(to_plain(machine_state()))},
        {"name": "platform", "value": wire_of(to_plain(platform_state()))},
    ]})
    by_construct = [(s.name, plain_of(s.value, s.name)) for s in PAYLOAD.parse(payload).sections]
    assert read_values(payload, True, "state") == by_construct
