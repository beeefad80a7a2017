"""A small ACPI Machine Language (AML) builder: enough to describe a microVM in a DSDT.

Every builder returns the encoded ``bytes`` of one AML term or one resource descriptor;
terms are composed by concatenation. Encodings follow the ACPI 6.x specification:

- §20.2 (AML grammar): name strings, data objects, PkgLength, the named-object and
  statement opcodes used here (Name, Scope, Device, Method, Return, Buffer, Package);
- §6.4 (resource data types): the small and large resource descriptors that make up a
  ``_CRS`` buffer (I/O port, Memory32Fixed, DWord/QWord memory address space, Extended
  Interrupt, End Tag);
- §6.1.5 (``_HID``): the compressed EISA ID form of a PNP id such as ``PNP0501``.

Only what avmm's DSDT needs is here; it is not a general ASL compiler. Values that do
not fit an encoding raise :class:`ValueError` instead of being truncated.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from typing import Final

# -- opcodes (§20.2) ----------------------------------------------------------------------

ZERO_OP: Final = 0x00
ONE_OP: Final = 0x01
ONES_OP: Final = 0xFF
NAME_OP: Final = 0x08
BYTE_PREFIX: Final = 0x0A
WORD_PREFIX: Final = 0x0B
DWORD_PREFIX: Final = 0x0C
STRING_PREFIX: Final = 0x0D
QWORD_PREFIX: Final = 0x0E
SCOPE_OP: Final = 0x10
BUFFER_OP: Final = 0x11
PACKAGE_OP: Final = 0x12
METHOD_OP: Final = 0x14
DUAL_NAME_PREFIX: Final = 0x2E
MULTI_NAME_PREFIX: Final = 0x2F
EXT_OP_PREFIX: Final = 0x5B
DEVICE_OP: Final = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR: Final = 0x5C  # '\'
PARENT_PREFIX_CHAR: Final = 0x5E  # '^'
RETURN_OP: Final = 0xA4
NULL_NAME: Final = 0x00

#: Largest value a PkgLength can encode (4 bytes: 4 + 8 + 8 + 8 bits).
PKG_LENGTH_MAX: Final = (1 << 28) - 1

_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


# -- name strings (§20.2.2) ---------------------------------------------------------------


def name_seg(name: str) -> bytes:
    """A NameSeg: 1-4 characters ``[A-Z_][A-Z0-9_]*``, padded to 4 with ``_``."""
    if not _NAME_SEG.fullmatch(name):
        raise ValueError(f"not an AML NameSeg (1-4 of [A-Z_][A-Z0-9_]*): {name!r}")
    return name.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString from ASL notation: ``\\_SB.COM1``, ``^^FOO``, ``_HID``, ``\\``.

    A leading ``\\`` is the root prefix, each leading ``^`` a parent prefix; the
    segments after them are dot-separated NameSegs (one plain, two with DualNamePrefix,
    more with MultiNamePrefix and a count, none as NullName).
    """
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix = bytes([ROOT_CHAR])
        rest = rest[1:]
    else:
        while rest.startswith("^"):
            prefix += bytes([PARENT_PREFIX_CHAR])
            rest = rest[1:]
    segments = rest.split(".") if rest else []
    encoded = b"".join(name_seg(s) for s in segments)
    if not segments:
        return prefix + bytes([NULL_NAME])
    if len(segments) == 1:
        return prefix + encoded
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + encoded
    if len(segments) > 255:
        raise ValueError(f"a NamePath has at most 255 segments, got {len(segments)}")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segments)]) + encoded


# -- PkgLength (§20.2.4) ------------------------------------------------------------------


def pkg_length(length: int) -> bytes:
    """The PkgLength encoding of ``length`` (which already counts the PkgLength bytes).

    One byte up to 63; otherwise the lead byte's bits 7:6 give the number of following
    bytes (1-3), its bits 3:0 the low nibble, and the following bytes the rest, least
    significant first: up to 0xFFF in 2 bytes, 0xFFFFF in 3, 0xFFFFFFF in 4.
    """
    if length < 0 or length > PKG_LENGTH_MAX:
        raise ValueError(f"PkgLength out of range 0..0x{PKG_LENGTH_MAX:x}: {length}")
    if length < 0x40:
        return bytes([length])
    following = 1 if length <= 0xFFF else 2 if length <= 0xFFFFF else 3
    lead = (following << 6) | (length & 0x0F)
    return bytes([lead]) + (length >> 4).to_bytes(following, "little")


def with_pkg_length(body: bytes) -> bytes:
    """``body`` preceded by the PkgLength that covers itself and ``body``."""
    for size in (1, 2, 3, 4):
        encoded = pkg_length(len(body) + size) if len(body) + size <= PKG_LENGTH_MAX else b""
        if len(encoded) == size:
            return encoded + body
    raise ValueError(f"{len(body)} bytes do not fit a PkgLength")


# -- data objects (§20.2.3) ---------------------------------------------------------------


def integer(value: int) -> bytes:
    """The shortest ComputationalData for ``value``: ZeroOp, OneOp or a sized prefix."""
    if value < 0 or value > 0xFFFF_FFFF_FFFF_FFFF:
        raise ValueError(f"AML integers are 0..2**64-1, got {value}")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    """A String: StringPrefix, ASCII characters 0x01-0x7F, NUL."""
    data = text.encode("ascii")
    if b"\x00" in data:
        raise ValueError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + data + b"\x00"


def buffer(data: bytes) -> bytes:
    """A DefBuffer whose BufferSize is ``len(data)`` and whose contents are ``data``."""
    return bytes([BUFFER_OP]) + with_pkg_length(integer(len(data)) + bytes(data))


def package(elements: Iterable[bytes]) -> bytes:
    """A DefPackage of already-encoded elements (integers, strings, name strings, ...)."""
    items = list(elements)
    if len(items) > 255:
        raise ValueError(f"a Package has at most 255 elements, got {len(items)}")
    return bytes([PACKAGE_OP]) + with_pkg_length(bytes([len(items)]) + b"".join(items))


def eisa_id(pnp_id: str) -> int:
    """The 32-bit compressed EISA ID of ``AAA####`` (three letters, four hex digits).

    Each letter becomes 5 bits (``'A'`` = 1), the product number 16 bits, packed big
    endian into 4 bytes; AML stores those bytes as a little-endian DWord, so
    ``eisa_id("PNP0501") == 0x0105D041``.
    """
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", pnp_id):
        raise ValueError(f"not an EISA id (three letters A-Z, four hex digits): {pnp_id!r}")
    letters = 0
    for char in pnp_id[:3]:
        letters = (letters << 5) | (ord(char) - 0x40)
    big_endian = letters.to_bytes(2, "big") + int(pnp_id[3:], 16).to_bytes(2, "big")
    return int.from_bytes(big_endian, "little")


def eisa_id_object(pnp_id: str) -> bytes:
    """The ``EISAID("...")`` data object: always a DWord, as ASL compilers emit it."""
    return bytes([DWORD_PREFIX]) + struct.pack("<I", eisa_id(pnp_id))


# -- named objects and statements (§20.2.5) ----------------------------------------------


def name(path: str, data: bytes) -> bytes:
    """DefName: ``Name (path, data)``."""
    return bytes([NAME_OP]) + name_string(path) + data


def scope(path: str, terms: Iterable[bytes]) -> bytes:
    """DefScope: ``Scope (path) { terms }``."""
    return bytes([SCOPE_OP]) + with_pkg_length(name_string(path) + b"".join(terms))


def device(path: str, terms: Iterable[bytes]) -> bytes:
    """DefDevice: ``Device (path) { terms }`` (ExtOpPrefix 0x5B, DeviceOp 0x82)."""
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + with_pkg_length(
        name_string(path) + b"".join(terms)
    )


def method(
    path: str,
    terms: Iterable[bytes],
    *,
    args: int = 0,
    serialized: bool = False,
    sync_level: int = 0,
) -> bytes:
    """DefMethod: ``Method (path, args, [Not]Serialized, sync_level) { terms }``."""
    if not 0 <= args <= 7:
        raise ValueError(f"a method takes 0..7 arguments, got {args}")
    if not 0 <= sync_level <= 15:
        raise ValueError(f"sync level is 0..15, got {sync_level}")
    flags = args | (0x08 if serialized else 0) | (sync_level << 4)
    return bytes([METHOD_OP]) + with_pkg_length(
        name_string(path) + bytes([flags]) + b"".join(terms)
    )


def return_(value: bytes) -> bytes:
    """DefReturn: ``Return (value)`` for an already-encoded data object."""
    return bytes([RETURN_OP]) + value


# -- resource descriptors (§6.4) ----------------------------------------------------------

#: Small item: I/O port descriptor, 7 bytes of data (tag 0x47).
IO_PORT_TAG: Final = 0x47
#: Small item: End Tag, 1 byte of data (tag 0x79).
END_TAG: Final = 0x79
#: Large items.
MEMORY32_FIXED_TAG: Final = 0x86
DWORD_ADDRESS_TAG: Final = 0x87
EXTENDED_INTERRUPT_TAG: Final = 0x89
QWORD_ADDRESS_TAG: Final = 0x8A

# Extended Interrupt descriptor flags (§6.4.3.6).
INTERRUPT_CONSUMER: Final = 0x01
INTERRUPT_EDGE: Final = 0x02
INTERRUPT_ACTIVE_LOW: Final = 0x04
INTERRUPT_SHARED: Final = 0x08
INTERRUPT_WAKE_CAPABLE: Final = 0x10

# Address space descriptor fields (§6.4.3.5).
ADDRESS_SPACE_MEMORY: Final = 0
#: General flags bit 0: the device consumes the range (clear: it produces and consumes it).
ADDRESS_CONSUMER: Final = 0x01
ADDRESS_MIN_FIXED: Final = 0x04
ADDRESS_MAX_FIXED: Final = 0x08
MEMORY_READ_WRITE: Final = 0x01
MEMORY_NON_CACHEABLE: Final = 0x00
MEMORY_CACHEABLE: Final = 0x02


def _large(tag: int, data: bytes) -> bytes:
    return bytes([tag]) + struct.pack("<H", len(data)) + data


def io_port(minimum: int, maximum: int, alignment: int, length: int, *, decode16: bool = True
            ) -> bytes:
    """``IO (Decode16, minimum, maximum, alignment, length)``: small item 0x47."""
    if not (0 <= minimum <= 0xFFFF and 0 <= maximum <= 0xFFFF):
        raise ValueError("I/O port bases are 16-bit")
    if not (0 <= alignment <= 0xFF and 0 <= length <= 0xFF):
        raise ValueError("I/O port alignment and length are 8-bit")
    return struct.pack(
        "<BBHHBB", IO_PORT_TAG, 1 if decode16 else 0, minimum, maximum, alignment, length
    )


def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """``Memory32Fixed (ReadWrite, base, length)``: large item 0x86."""
    if not (0 <= base <= 0xFFFF_FFFF and 0 <= length <= 0xFFFF_FFFF):
        raise ValueError("Memory32Fixed base and length are 32-bit")
    if base + length > 1 << 32:
        raise ValueError("Memory32Fixed range must end at or below 4 GiB")
    return _large(MEMORY32_FIXED_TAG, struct.pack("<BII", int(writable), base, length))


def _address_flags(minimum: int, maximum: int, length: int) -> tuple[int, int]:
    if length == 0 or maximum - minimum + 1 != length:
        raise ValueError("a fixed memory range needs length == maximum - minimum + 1 > 0")
    general = ADDRESS_CONSUMER | ADDRESS_MIN_FIXED | ADDRESS_MAX_FIXED
    return general, MEMORY_READ_WRITE | MEMORY_NON_CACHEABLE


def dword_memory(base: int, length: int) -> bytes:
    """``DWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, NonCacheable,
    ReadWrite, 0, base, base + length - 1, 0, length)``: large item 0x87."""
    maximum = base + length - 1
    if not (base >= 0 and maximum <= 0xFFFF_FFFF):
        raise ValueError("DWordMemory ranges lie below 4 GiB")
    general, specific = _address_flags(base, maximum, length)
    return _large(
        DWORD_ADDRESS_TAG,
        struct.pack("<BBBIIIII", ADDRESS_SPACE_MEMORY, general, specific, 0, base, maximum,
                    0, length),
    )


def qword_memory(base: int, length: int) -> bytes:
    """``QWordMemory (...)`` as :func:`dword_memory` with 64-bit fields: large item 0x8A."""
    maximum = base + length - 1
    if not (base >= 0 and maximum <= 0xFFFF_FFFF_FFFF_FFFF):
        raise ValueError("QWordMemory ranges lie below 2**64")
    general, specific = _address_flags(base, maximum, length)
    return _large(
        QWORD_ADDRESS_TAG,
        struct.pack("<BBBQQQQQ", ADDRESS_SPACE_MEMORY, general, specific, 0, base, maximum,
                    0, length),
    )


def interrupt(
    *gsis: int,
    edge: bool = True,
    active_low: bool = False,
    shared: bool = False,
    wake_capable: bool = False,
    consumer: bool = True,
) -> bytes:
    """``Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared)
    {gsis}``: the Extended Interrupt descriptor, large item 0x89, without a resource
    source."""
    if not 1 <= len(gsis) <= 255:
        raise ValueError("an Interrupt descriptor lists 1..255 interrupts")
    if any(not 0 <= gsi <= 0xFFFF_FFFF for gsi in gsis):
        raise ValueError("interrupt numbers are 32-bit")
    flags = (
        (INTERRUPT_CONSUMER if consumer else 0)
        | (INTERRUPT_EDGE if edge else 0)
        | (INTERRUPT_ACTIVE_LOW if active_low else 0)
        | (INTERRUPT_SHARED if shared else 0)
        | (INTERRUPT_WAKE_CAPABLE if wake_capable else 0)
    )
    return _large(
        EXTENDED_INTERRUPT_TAG,
        bytes([flags, len(gsis)]) + struct.pack(f"<{len(gsis)}I", *gsis),
    )


def end_tag() -> bytes:
    """The End Tag (small item 0x79) with checksum 0 ("the buffer is not checksummed")."""
    return bytes([END_TAG, 0])


def resource_template(descriptors: Iterable[bytes]) -> bytes:
    """``ResourceTemplate () { descriptors }``: a Buffer of the descriptors + End Tag."""
    return buffer(b"".join(descriptors) + end_tag())


# -- composites ---------------------------------------------------------------------------


def hid(value: str) -> bytes:
    """``Name (_HID, ...)``: an EISAID for ``AAA####`` ids, otherwise a string
    (ACPI ids such as ``LNRO0005``)."""
    if re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", value):
        return name("_HID", eisa_id_object(value))
    return name("_HID", string(value))


def uid(value: int) -> bytes:
    """``Name (_UID, value)``."""
    return name("_UID", integer(value))


def crs(descriptors: Iterable[bytes]) -> bytes:
    """``Name (_CRS, ResourceTemplate () { descriptors })``."""
    return name("_CRS", resource_template(descriptors))


def constant_method(path: str, value: int) -> bytes:
    """``Method (path, 0, NotSerialized) { Return (value) }``, e.g. a fixed ``_STA``."""
    return method(path, [return_(integer(value))])
