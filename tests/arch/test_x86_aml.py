"""The AML builder: encodings checked byte by byte against ACPI 6.x §20 and §6.4, and a
DSDT using every builder round-tripped through iasl (disassemble, recompile, compare)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avmm.arch.x86 import aml
from avmm.arch.x86.acpi import HEADER_LENGTH, build_table
from tests.prerequisites import require


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(value, bytes used) of the PkgLength at the start of ``data``."""
    lead = data[0]
    following = lead >> 6
    if following == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(following):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + following


# -- name strings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "encoded"),
    [("_SB", b"_SB_"), ("COM1", b"COM1"), ("A", b"A___"), ("_", b"____"), ("X1", b"X1__")],
)
def test_name_seg_pads_with_underscores(name: str, encoded: bytes) -> None:
    assert aml.name_seg(name) == encoded


@pytest.mark.parametrize("bad", ["", "1ABC", "com1", "ABCDE", "A-B", "A.B"])
def test_name_seg_rejects_invalid_names(bad: str) -> None:
    with pytest.raises(ValueError):
        aml.name_seg(bad)


@pytest.mark.parametrize(
    ("path", "encoded"),
    [
        ("_HID", b"_HID"),
        ("\\", b"\\\x00"),
        ("\\_SB", b"\\_SB_"),
        ("\\_SB.COM1", b"\\\x2e_SB_COM1"),
        ("_SB.PCI0.ISA", b"\x2f\x03_SB_PCI0ISA_"),
        ("^FOO", b"^FOO_"),
        ("^^A.B", b"^^\x2eA___B___"),
        ("^", b"^\x00"),
    ],
)
def test_name_string_prefixes(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


# -- PkgLength ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x00"),
        (63, b"\x3f"),
        (64, b"\x40\x04"),
        (0x65, b"\x45\x06"),
        (4095, b"\x4f\xff"),
        (4096, b"\x80\x00\x01"),
        (0xFFFFF, b"\x8f\xff\xff"),
        (0x100000, b"\xc0\x00\x00\x01"),
        (0xFFFFFFF, b"\xcf\xff\xff\xff"),
    ],
)
def test_pkg_length_encodings(length: int, encoded: bytes) -> None:
    assert aml.pkg_length(length) == encoded
    assert decode_pkg_length(encoded) == (length, len(encoded))


@pytest.mark.parametrize("bad", [-1, 1 << 28])
def test_pkg_length_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        aml.pkg_length(bad)


@pytest.mark.parametrize(
    ("body_length", "prefix"),
    [
        (0, b"\x01"),
        (62, b"\x3f"),  # 62 + 1 = 63: the largest one-byte PkgLength
        (63, b"\x41\x04"),  # 63 + 1 = 64 needs two bytes, so 65
        (4093, b"\x4f\xff"),  # 4093 + 2 = 4095: the largest two-byte PkgLength
        (4094, b"\x81\x00\x01"),  # 4094 + 2 = 4096 needs three bytes, so 4097
    ],
)
def test_with_pkg_length_counts_its_own_bytes(body_length: int, prefix: bytes) -> None:
    body = bytes(body_length)
    assert aml.with_pkg_length(body) == prefix + body


@given(st.integers(min_value=0, max_value=0x12000))
def test_with_pkg_length_is_exact(body_length: int) -> None:
    encoded = aml.with_pkg_length(bytes(body_length))
    value, used = decode_pkg_length(encoded)
    assert value == len(encoded)
    assert used + body_length == len(encoded)


# -- data objects ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0xFFFF, b"\x0b\xff\xff"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),
        (0xFFFF_FFFF, b"\x0c\xff\xff\xff\xff"),
        (0x1_0000_0000, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
        (0xFFFF_FFFF_FFFF_FFFF, b"\x0e" + b"\xff" * 8),
    ],
)
def test_integer_prefix_by_value(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("bad", [-1, 1 << 64])
def test_integer_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        aml.integer(bad)


def test_string() -> None:
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    assert aml.string("") == b"\x0d\x00"
    with pytest.raises(ValueError):
        aml.string("a\x00b")


def test_buffer_and_package() -> None:
    # Buffer: BufferOp, PkgLength (5 = itself + BytePrefix 2 + 2 data bytes), size, data.
    assert aml.buffer(b"\x79\x00") == b"\x11\x05\x0a\x02\x79\x00"
    assert aml.buffer(b"") == b"\x11\x02\x00"
    # Package: PackageOp, PkgLength, NumElements, elements.
    assert aml.package([aml.integer(1), aml.string("a")]) == b"\x12\x06\x02\x01\x0da\x00"
    assert aml.package([]) == b"\x12\x02\x00"


def test_eisa_id() -> None:
    assert aml.eisa_id("PNP0501") == 0x0105D041
    assert aml.eisa_id("PNP0A03") == 0x030AD041
    assert aml.eisa_id("PNP0C0F") == 0x0F0CD041
    assert aml.eisa_id_object("PNP0501") == b"\x0c\x41\xd0\x05\x01"
    for bad in ("PNP050", "pnp0501", "PNP050G", "LNRO0005"):
        with pytest.raises(ValueError):
            aml.eisa_id(bad)


# -- named objects -----------------------------------------------------------------------


def test_name_scope_device_method() -> None:
    assert aml.name("_UID", aml.integer(0)) == b"\x08_UID\x00"
    assert aml.scope("\\_SB", []) == b"\x10\x06\\_SB_"
    assert aml.device("COM1", []) == b"\x5b\x82\x05COM1"
    # Method (_STA, 0, NotSerialized) { Return (0x0F) }
    assert aml.constant_method("_STA", 0x0F) == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    flags = aml.method("FOO", [], args=2, serialized=True, sync_level=3)[-1]
    assert flags == 0x3A
    with pytest.raises(ValueError):
        aml.method("FOO", [], args=8)


def test_hid_picks_eisa_id_or_string() -> None:
    assert aml.hid("PNP0501") == b"\x08_HID\x0c\x41\xd0\x05\x01"
    assert aml.hid("LNRO0005") == b"\x08_HID\x0dLNRO0005\x00"


# -- resource descriptors ----------------------------------------------------------------


def test_io_port() -> None:
    assert aml.io_port(0x3F8, 0x3F8, 1, 8) == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    with pytest.raises(ValueError):
        aml.io_port(0x10000, 0, 1, 1)


def test_memory32_fixed() -> None:
    assert aml.memory32_fixed(0xD000_0000, 0x1000) == (
        b"\x86\x09\x00\x01" b"\x00\x00\x00\xd0" b"\x00\x10\x00\x00"
    )
    assert aml.memory32_fixed(0x1000, 0x200, writable=False)[3] == 0
    with pytest.raises(ValueError):
        aml.memory32_fixed(0xFFFF_F000, 0x2000)


def test_address_space_memory() -> None:
    dword = aml.dword_memory(0xD000_0000, 0x1000)
    assert dword[:6] == b"\x87\x17\x00\x00\x0d\x01"
    assert dword[6:] == (0).to_bytes(4, "little") + (0xD000_0000).to_bytes(4, "little") + (
        0xD000_0FFF
    ).to_bytes(4, "little") + bytes(4) + (0x1000).to_bytes(4, "little")
    qword = aml.qword_memory(0x1_0000_0000, 0x1000)
    assert qword[:6] == b"\x8a\x2b\x00\x00\x0d\x01"
    assert len(qword) == 3 + 0x2B
    with pytest.raises(ValueError):
        aml.dword_memory(0xFFFF_F000, 0x2000)


def test_extended_interrupt() -> None:
    # Consumer, edge, active high, exclusive: flags 0x03.
    assert aml.interrupt(5) == b"\x89\x06\x00\x03\x01\x05\x00\x00\x00"
    # Consumer, level, active low, shared: 0x01 | 0x04 | 0x08.
    level = aml.interrupt(16, 17, edge=False, active_low=True, shared=True)
    assert level == b"\x89\x0a\x00\x0d\x02\x10\x00\x00\x00\x11\x00\x00\x00"
    with pytest.raises(ValueError):
        aml.interrupt()


def test_end_tag_and_template() -> None:
    assert aml.end_tag() == b"\x79\x00"
    assert aml.resource_template([]) == aml.buffer(b"\x79\x00")
    crs = aml.crs([aml.interrupt(4)])
    assert crs == b"\x08_CRS" + aml.buffer(aml.interrupt(4) + b"\x79\x00")


# -- iasl round trip -----------------------------------------------------------------------


def everything_dsdt() -> bytes:
    """A DSDT using every builder (nested scopes, prefixes, methods, all descriptors)."""
    body = aml.scope(
        "\\_SB",
        [
            aml.device(
                "DEV0",
                [
                    aml.hid("PNP0C02"),
                    aml.uid(0x1234_5678_9A),
                    aml.name("STR0", aml.string("hello")),
                    aml.name("PKG0", aml.package([aml.integer(0x10000), aml.string("x")])),
                    aml.name("BUF0", aml.buffer(bytes(range(100)))),
                    aml.constant_method("_STA", 0x0F),
                    aml.method("MTH1", [aml.return_(aml.integer(7))], args=1, serialized=True),
                    aml.crs(
                        [
                            aml.io_port(0x60, 0x60, 1, 1),
                            aml.memory32_fixed(0xFED0_0000, 0x400),
                            aml.dword_memory(0xD000_0000, 0x1000),
                            aml.qword_memory(0x8_0000_0000, 0x10_0000),
                            aml.interrupt(9, edge=False, active_low=True, shared=True),
                        ]
                    ),
                ],
            ),
            aml.scope("DEV0", [aml.name("^NEXT", aml.integer(3))]),
            aml.name("\\_SB.DEV0.ABS", aml.integer(0xFFFF_FFFF_FFFF)),
        ],
    )
    return build_table(b"DSDT", 2, body)


def run(tool: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_iasl_round_trip_of_every_builder(tmp_path: Path) -> None:
    require(None if shutil.which("iasl") else "iasl is not installed (acpica-tools)")
    table = everything_dsdt()
    (tmp_path / "dsdt.dat").write_bytes(table)
    output = run("iasl", "-d", "dsdt.dat", cwd=tmp_path)
    assert "Error" not in output and "Warning" not in output, output
    dsl = (tmp_path / "dsdt.dsl").read_text()
    for expected in (
        'EisaId ("PNP0C02")',
        "Name (_UID, 0x000000123456789A)",
        'Name (STR0, "hello")',
        "Method (_STA, 0, NotSerialized)",
        "Method (MTH1, 1, Serialized)",
        "Return (0x0F)",
        "Memory32Fixed (ReadWrite,",
        "0xFED00000,",
        "DWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
        "QWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
        "0x0000000800000000,",
        "Interrupt (ResourceConsumer, Level, ActiveLow, Shared, ,, )",
        "IO (Decode16,",
        "Name (^NEXT, 0x03)",
        "Name (\\_SB.DEV0.ABS, 0x0000FFFFFFFFFFFF)",
    ):
        assert expected in dsl, (expected, dsl)
    # Recompiled without iasl's optimizations, the AML after the header is byte-identical.
    run("iasl", "-oa", "-p", "again", "dsdt.dsl", cwd=tmp_path)
    again = (tmp_path / "again.aml").read_bytes()
    assert again[HEADER_LENGTH:] == table[HEADER_LENGTH:]
