"""The state file: sections round-trip; a truncated, bit-flipped, wrong-version or
otherwise wrong file is one SnapshotError line, never a traceback or a half state."""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path

import pytest

from avmm.state import MachineState, SnapshotError, VmPlatformState
from avmm.state.format import (
    FORMAT_VERSION,
    MAGIC,
    MAX_STATE_FILE_BYTES,
    build_state,
    parse_state,
    read_state_file,
    write_state_file,
)

from .samples import machine_state, platform_state

EXPECT = {"machine": MachineState}


@pytest.fixture(scope="module")
def state_bytes() -> bytes:
    return build_state({"machine": machine_state()})


def _one_line_error(data: bytes, expect: dict = EXPECT) -> str:
    with pytest.raises(SnapshotError) as caught:
        parse_state(data, expect, name="state.avmm")
    message = str(caught.value)
    assert message.startswith("state.avmm: ") and "\n" not in message, message
    return message


def test_sections_round_trip(state_bytes):
    assert parse_state(state_bytes, EXPECT) == {"machine": machine_state()}


def test_layout_magic_version_writer_and_digest(state_bytes):
    import avmm

    assert state_bytes.startswith(MAGIC + struct.pack("<I", FORMAT_VERSION))
    writer = f"avmm {avmm.__version__}".encode()
    assert state_bytes[12] == len(writer) and state_bytes[13:13 + len(writer)] == writer
    assert hashlib.sha256(state_bytes[:-32]).digest() == state_bytes[-32:]


def test_truncation_at_ten_offsets_is_one_line(state_bytes):
    size = len(state_bytes)
    offsets = [0, 1, 7, 9, 14, 30, size // 3, size // 2, size - 32, size - 1]
    assert len(set(offsets)) == 10
    for offset in offsets:
        message = _one_line_error(state_bytes[:offset])
        assert "truncated" in message, (offset, message)


def test_a_hundred_random_bit_flips_are_one_line_each(state_bytes):
    rng = random.Random(2026)
    for _ in range(100):
        bit = rng.randrange(len(state_bytes) * 8)
        data = bytearray(state_bytes)
        data[bit // 8] ^= 1 << (bit % 8)
        _one_line_error(bytes(data))


def test_wrong_magic(state_bytes):
    message = _one_line_error(b"NOTASNAP" + state_bytes[8:])
    assert message == "state.avmm: not an avmm snapshot state file (no AVMMSNAP magic)"


def test_wrong_format_version_names_both_versions(state_bytes):
    data = MAGIC + struct.pack("<I", FORMAT_VERSION + 1) + state_bytes[12:]
    message = _one_line_error(data)
    assert f"written in state file format {FORMAT_VERSION + 1}" in message
    assert f"reads format {FORMAT_VERSION}" in message


def test_bytes_after_the_end(state_bytes):
    assert "3 bytes after its end" in _one_line_error(state_bytes + b"xyz")


def test_sections_must_be_exactly_the_expected_ones():
    platform = platform_state()
    data = build_state({"machine": machine_state(), "platform": platform})
    assert "unknown section 'platform'" in _one_line_error(data)
    assert "has no 'machine' section" in _one_line_error(
        build_state({"platform": platform}), {"machine": MachineState, "platform": VmPlatformState})
    assert parse_state(data, {"machine": MachineState, "platform": VmPlatformState}) == {
        "machine": machine_state(), "platform": platform}


def test_a_section_of_the_wrong_type_names_the_section():
    data = build_state({"machine": platform_state()})
    assert _one_line_error(data) == ("state.avmm: machine: expected a record of type "
                                     "MachineState, found one of type VmPlatformState")


def test_files_are_written_new_and_read_back(tmp_path: Path):
    path = tmp_path / "state.avmm"
    size = write_state_file(path, {"machine": machine_state()})
    assert path.stat().st_size == size
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_state_file(path, EXPECT) == {"machine": machine_state()}
    with pytest.raises(FileExistsError):
        write_state_file(path, {"machine": machine_state()})


def test_unreadable_files_are_one_line(tmp_path: Path):
    with pytest.raises(SnapshotError, match=r"missing\.avmm: no such state file$"):
        read_state_file(tmp_path / "missing.avmm", EXPECT)
    with pytest.raises(SnapshotError, match=r"is a directory, not a state file$"):
        read_state_file(tmp_path, EXPECT)
    huge = tmp_path / "huge.avmm"
    with open(huge, "wb") as f:
        f.truncate(MAX_STATE_FILE_BYTES + 1)
    with pytest.raises(SnapshotError, match="is too large for a state file"):
        read_state_file(huge, EXPECT)
