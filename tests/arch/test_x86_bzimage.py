"""The setup-header parser, on Debian's real bzImage and on fabricated images."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from avmm.arch.x86.bzimage import (
    MIN_PROTOCOL_VERSION,
    SETUP_HEADER_OFFSET,
    SETUP_HEADER_SIZE,
    XLF_KERNEL_64,
    header_end,
    is_bzimage,
    parse_bzimage,
)
from avmm.errors import BootError

MakeBzImage = Callable[..., bytes]


@pytest.mark.debian_kernel
def test_debian_kernel_header(debian_kernel: Path) -> None:
    data = debian_kernel.read_bytes()
    image = parse_bzimage(data, name=str(debian_kernel))

    assert is_bzimage(data)
    assert image.header.header == b"HdrS"
    assert image.header.boot_flag == 0xAA55
    assert image.protocol_version >= MIN_PROTOCOL_VERSION
    assert image.xloadflags & XLF_KERNEL_64
    assert image.setup_size == ((data[0x1F1] or 4) + 1) * 512
    # The protected-mode code is syssize paragraphs; whatever follows is Debian's
    # appended Authenticode signature, which the PE header's certificate table locates.
    assert len(image.payload) == image.header.syssize * 16
    assert image.setup_size + len(image.payload) + image.trailing_bytes == len(data)
    pe_offset = struct.unpack_from("<I", data, 0x3C)[0]
    if data[:2] == b"MZ" and data[pe_offset:pe_offset + 4] == b"PE\0\0":
        cert_offset, cert_size = struct.unpack_from("<II", data, pe_offset + 24 + 112 + 4 * 8)
        assert (cert_offset, cert_size) in ((0, 0), (len(data) - image.trailing_bytes,
                                                       image.trailing_bytes))
    assert image.payload == data[image.setup_size:image.setup_size + len(image.payload)]

    release = (debian_kernel.parent / "VERSION").read_text().strip()
    assert image.version_string.startswith(release)
    assert image.relocatable_kernel
    assert image.initrd_addr_max >= 0x37FF_FFFF
    assert image.kernel_alignment & (image.kernel_alignment - 1) == 0
    assert image.cmdline_size > 255
    assert image.init_size > len(image.payload)
    assert image.entry_point == 0x100200
    start, end = image.runtime_range()
    assert start == max(image.pref_address, 0x200000)
    assert end == start + image.init_size
    # Header bytes: the kernel's own, up to its declared end.
    assert image.header_bytes[: header_end(data) - SETUP_HEADER_OFFSET] == data[
        SETUP_HEADER_OFFSET:header_end(data)
    ]


@pytest.mark.debian_kernel
def test_debian_kernel_truncated(debian_kernel: Path) -> None:
    data = debian_kernel.read_bytes()
    with pytest.raises(BootError, match=r"vmlinuz: truncated: \d+ bytes"):
        parse_bzimage(data[: len(data) // 2], name=str(debian_kernel))


def test_fake_image_parses(make_bzimage: MakeBzImage) -> None:
    payload = b"\x90" * 4096
    image = parse_bzimage(make_bzimage(payload))
    assert image.payload == payload
    assert image.setup_size == 5 * 512
    assert image.protocol_version_str == "2.15"
    assert image.version_string == "6.99.0-fake (avmm tests) #1"
    assert image.cmdline_size == 2047
    assert image.trailing_bytes == 0
    assert image.runtime_range() == (0x1000000, 0x1800000)
    assert image.image_end() == 0x1800000


def test_setup_sects_zero_means_four(make_bzimage: MakeBzImage) -> None:
    assert parse_bzimage(make_bzimage(setup_sects=0)).setup_size == 5 * 512


def test_bytes_past_declared_header_end_are_zeroed(make_bzimage: MakeBzImage) -> None:
    # A 2.12 header ends after init_size (0x264); kernel_info_offset is setup code.
    data = bytearray(make_bzimage(version=0x020C, jump=0xEB | (0x62 << 8)))
    data[0x264:0x26C] = b"\xff" * 8
    image = parse_bzimage(bytes(data))
    assert image.header.handover_offset == 0
    assert image.header.kernel_info_offset == 0
    assert len(image.header_bytes) == SETUP_HEADER_SIZE


def test_non_relocatable_kernel_runs_at_pref_address(make_bzimage: MakeBzImage) -> None:
    image = parse_bzimage(make_bzimage(relocatable_kernel=0, pref_address=0x400000))
    assert image.runtime_range() == (0x400000, 0x400000 + 0x800000)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"header": b"HdrX"}, r"not a bzImage: no 'HdrS' magic at 0x202"),
        ({"boot_flag": 0x55AA}, r"bad boot flag 0x55aa at 0x1fe"),
        ({"version": 0x020B}, r"boot protocol 2.11 is too old; avmm needs 2.12"),
        ({"xloadflags": 0x2}, r"the kernel has no 64-bit entry point \(XLF_KERNEL_64"),
        ({"syssize": 0}, r"syssize is 0"),
        ({"kernel_alignment": 0x300000}, r"kernel_alignment 0x300000 is not a power of two"),
    ],
)
def test_bad_headers_are_rejected(
    make_bzimage: MakeBzImage, change: dict[str, object], message: str
) -> None:
    with pytest.raises(BootError, match=r"^bzImage-under-test: " + message):
        parse_bzimage(make_bzimage(**change), name="bzImage-under-test")


def test_too_short_for_a_header() -> None:
    with pytest.raises(BootError, match=r"too short for a bzImage"):
        parse_bzimage(b"\0" * 0x200)


def test_truncated_payload(make_bzimage: MakeBzImage) -> None:
    data = make_bzimage(b"\x01" * 8192)
    with pytest.raises(BootError, match=r"^kernel image: truncated: 10704 bytes.*need 10752$"):
        parse_bzimage(data[:-48])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # Sizes taken from the header must fit the file, whatever they claim.
        ({"syssize": 0xFFFF_FFFF}, r"truncated: \d+ bytes, but the setup code \(2560 bytes\) "
                                   r"and the protected-mode code \(68719476720 bytes\)"),
        ({"setup_sects": 0xFF}, r"truncated: \d+ bytes, but the setup code \(131072 bytes\)"),
        ({"header": b"HdrT"}, r"not a bzImage: no 'HdrS' magic at 0x202"),
    ],
)
def test_hostile_sizes_are_refused(make_bzimage: MakeBzImage, change: dict[str, object],
                                   message: str) -> None:
    with pytest.raises(BootError, match=r"^hostile: " + message):
        parse_bzimage(make_bzimage(**change), name="hostile")


def test_header_fields_are_read_at_the_boot_protocols_offsets(make_bzimage: MakeBzImage) -> None:
    """Each field at the offset Documentation/arch/x86/boot.rst gives, read directly."""
    data = make_bzimage(init_size=0x123000, pref_address=0x2000000, cmdline_size=4095,
                        initrd_addr_max=0x3FFF_FFFF, handover_offset=0x190)
    image = parse_bzimage(data)
    u32 = lambda offset: struct.unpack_from("<I", data, offset)[0]  # noqa: E731
    assert image.header.version == struct.unpack_from("<H", data, 0x206)[0] == 0x020F
    assert image.init_size == u32(0x260) == 0x123000
    assert image.pref_address == struct.unpack_from("<Q", data, 0x258)[0] == 0x2000000
    assert image.cmdline_size == u32(0x238) == 4095
    assert image.initrd_addr_max == u32(0x22C) == 0x3FFF_FFFF
    assert image.header.handover_offset == u32(0x264) == 0x190
    assert image.xloadflags == struct.unpack_from("<H", data, 0x236)[0]
    assert image.header_bytes == data[SETUP_HEADER_OFFSET:0x26C]


def test_a_kernel_version_pointer_outside_the_setup_code_is_ignored(
    make_bzimage: MakeBzImage,
) -> None:
    assert parse_bzimage(make_bzimage(kernel_version=0xFFFF)).version_string == ""
    assert parse_bzimage(make_bzimage()).version_string.startswith("6.99.0-fake")
