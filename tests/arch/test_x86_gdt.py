"""Segment descriptors: known encodings, round trips, the boot GDT."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avmm.arch.x86.gdt import (
    BOOT_CODE_SEGMENT,
    BOOT_DATA_SEGMENT,
    BOOT_TSS_SEGMENT,
    DescriptorError,
    Segment,
    boot_gdt,
    build_gdt,
    decode_segment,
    encode_segment,
)
from avmm.arch.x86.layout import BOOT_TSS_ADDRESS


def test_known_encodings() -> None:
    # The classic flat descriptors every 64-bit OS uses.
    assert int.from_bytes(encode_segment(BOOT_CODE_SEGMENT), "little") == 0x00AF9B000000FFFF
    assert int.from_bytes(encode_segment(BOOT_DATA_SEGMENT), "little") == 0x00CF93000000FFFF
    tss = encode_segment(BOOT_TSS_SEGMENT)
    assert len(tss) == 16
    low = int.from_bytes(tss[:8], "little")
    assert low == 0x00008B0000000067 | (BOOT_TSS_ADDRESS << 16)
    assert tss[8:] == bytes(8)


def test_boot_gdt_layout() -> None:
    gdt = boot_gdt()
    assert len(gdt) == 0x30
    assert gdt[0x00:0x10] == bytes(16)  # null, and the unused __KERNEL32_CS slot
    assert decode_segment(gdt[0x10:], 0x10) == BOOT_CODE_SEGMENT
    assert decode_segment(gdt[0x18:], 0x18) == BOOT_DATA_SEGMENT
    assert decode_segment(gdt[0x20:], 0x20) == BOOT_TSS_SEGMENT
    assert BOOT_CODE_SEGMENT.l and not BOOT_CODE_SEGMENT.db
    assert BOOT_CODE_SEGMENT.limit == BOOT_DATA_SEGMENT.limit == 0xFFFF_FFFF


@st.composite
def segments(draw: st.DrawFn) -> Segment:
    system = draw(st.booleans())
    granular = draw(st.booleans())
    raw_limit = draw(st.integers(0, 0xFFFFF))
    return Segment(
        base=draw(st.integers(0, (1 << (64 if system else 32)) - 1)),
        limit=(raw_limit << 12) | 0xFFF if granular else raw_limit,
        selector=draw(st.integers(1, 0x1FFF)) * 8,
        type=draw(st.integers(0, 15)),
        present=draw(st.booleans()),
        dpl=draw(st.integers(0, 3)),
        db=draw(st.booleans()),
        s=not system,
        l=draw(st.booleans()),
        g=granular,
        avl=draw(st.booleans()),
    )


@given(segments())
def test_round_trip(segment: Segment) -> None:
    encoded = encode_segment(segment)
    assert len(encoded) == segment.descriptor_size
    assert decode_segment(encoded, segment.selector) == segment


@given(st.binary(min_size=16, max_size=16))
def test_decode_encode_round_trip(raw: bytes) -> None:
    segment = decode_segment(raw, 0x8)
    encoded = encode_segment(segment)
    if segment.s:
        assert encoded == raw[:8]
    else:
        assert encoded[:8] == raw[:8] and encoded[8:12] == raw[8:12]  # reserved dword zero


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        (Segment(0, 0x100000, 8, 3), r"limit 0x100000 with g=0 exceeds 0xfffff"),
        (Segment(0, 0x1000, 8, 3, g=True), r"with g=1 must be 0x...fff"),
        (Segment(1 << 32, 0, 8, 3), r"base 0x100000000 does not fit 32 bits"),
        (Segment(0, 0, 8, 16), r"type 16"),
    ],
)
def test_unencodable(segment: Segment, message: str) -> None:
    with pytest.raises(DescriptorError, match=message):
        encode_segment(segment)


def test_gdt_selector_errors() -> None:
    with pytest.raises(DescriptorError, match="nonzero GDT index"):
        build_gdt([Segment(0, 0, 0x13, 3)])
    with pytest.raises(DescriptorError, match="overlaps"):
        build_gdt([BOOT_TSS_SEGMENT, Segment(0, 0, 0x28, 3)])
    with pytest.raises(DescriptorError, match="16 bytes"):
        decode_segment(encode_segment(BOOT_TSS_SEGMENT)[:8], 0x20)
