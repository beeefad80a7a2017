"""Segment descriptors and the boot GDT.

A :class:`Segment` holds the same fields as KVM's ``struct kvm_segment`` (the hidden part
of a segment register), so the KVM layer can map it field by field. In particular
``limit`` is the *byte-granular* limit, as in a segment register and ``kvm_segment``;
the 20-bit descriptor field is derived from it (``limit >> 12`` when ``g`` is set).

The boot GDT follows the Linux boot protocol's convention: ``__BOOT_CS`` = 0x10 and
``__BOOT_DS`` = 0x18 must be flat 4 GiB segments. Slots 0x00 and 0x08 are null; a 64-bit
TSS descriptor (16 bytes in long mode) takes 0x20 and 0x28.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ...errors import AvmmError
from .layout import BOOT_TSS_ADDRESS

BOOT_CODE_SELECTOR: Final = 0x10
BOOT_DATA_SELECTOR: Final = 0x18
BOOT_TSS_SELECTOR: Final = 0x20
#: Size of a 64-bit TSS without an I/O permission bitmap.
TSS64_SIZE: Final = 104

# Code/data (s=1) type field bits.
TYPE_ACCESSED: Final = 0x1
TYPE_WRITABLE: Final = 0x2  # data: writable; code: readable
TYPE_CODE: Final = 0x8
#: Execute/read, accessed. VMX requires the accessed bit in a usable CS/SS/DS/.. cache.
TYPE_CODE_EXEC_READ_ACCESSED: Final = TYPE_CODE | TYPE_WRITABLE | TYPE_ACCESSED  # 0xb
#: Read/write, accessed.
TYPE_DATA_READ_WRITE_ACCESSED: Final = TYPE_WRITABLE | TYPE_ACCESSED  # 0x3
#: System (s=0) type of a 64-bit TSS marked busy, the only kind VMX accepts in TR in long
#: mode.
TYPE_TSS64_BUSY: Final = 0xB
TYPE_TSS64_AVAILABLE: Final = 0x9


class DescriptorError(AvmmError):
    """A Segment cannot be encoded as a descriptor, or descriptor bytes are malformed."""


@dataclass(frozen=True)
class Segment:
    """A segment as a segment register caches it (and as ``kvm_segment`` holds it).

    ``limit`` is in bytes (the largest valid offset). With ``g`` set it must end in 0xfff
    because the descriptor stores it in 4 KiB units. ``s`` is 1 for code/data and 0 for
    system segments (TSS, LDT), whose descriptors are 16 bytes in long mode.
    """

    base: int
    limit: int
    selector: int
    type: int
    present: bool = True
    dpl: int = 0
    db: bool = False
    s: bool = True
    l: bool = False  # noqa: E741  (the architectural name of the 64-bit code flag)
    g: bool = False
    avl: bool = False

    @property
    def unusable(self) -> bool:
        """KVM's ``unusable`` flag: a segment that is not present is not usable."""
        return not self.present

    @property
    def descriptor_size(self) -> int:
        """8 for code/data descriptors, 16 for long-mode system descriptors."""
        return 8 if self.s else 16


#: The 8-byte code/data descriptor (and the low half of a system descriptor), read as
#: one little-endian 64-bit integer (Intel SDM vol. 3, 3.4.5). Shifts and masks over
#: struct, not construct's BitStruct: the boot GDT is built on ``avmm up``'s way to the
#: guest's first byte (see ._packed). Bits 0-15 limit_low, 16-31 base_low, 32-39
#: base_mid, 40-43 type, 44 s, 45-46 dpl, 47 present, 48-51 limit_high, 52 avl, 53 l,
#: 54 db, 55 g, 56-63 base_high.
Descriptor = struct.Struct("<Q")
_TYPE_SHIFT, _S_BIT, _DPL_SHIFT, _PRESENT_BIT = 40, 44, 45, 47
_LIMIT_HIGH_SHIFT, _AVL_BIT, _L_BIT, _DB_BIT, _G_BIT = 48, 52, 53, 54, 55
#: Upper half of a 16-byte long-mode system descriptor: base_upper, reserved.
SystemDescriptorHigh = struct.Struct("<II")


def encode_segment(segment: Segment) -> bytes:
    """The GDT descriptor for ``segment``: 8 bytes, or 16 for a system segment (s=0).

    :raises DescriptorError: a field does not fit its descriptor field, or ``limit`` is
        not representable with the chosen granularity.
    """
    if segment.g:
        if segment.limit & 0xFFF != 0xFFF or segment.limit > 0xFFFF_FFFF:
            raise DescriptorError(
                f"segment limit 0x{segment.limit:x} with g=1 must be 0x...fff and fit 32 bits"
            )
        raw_limit = segment.limit >> 12
    else:
        if segment.limit > 0xFFFFF:
            raise DescriptorError(f"segment limit 0x{segment.limit:x} with g=0 exceeds 0xfffff")
        raw_limit = segment.limit
    base_bits = 32 if segment.s else 64
    if not 0 <= segment.base < 1 << base_bits:
        raise DescriptorError(f"segment base 0x{segment.base:x} does not fit {base_bits} bits")
    if not 0 <= segment.type <= 0xF or not 0 <= segment.dpl <= 3 or segment.limit < 0:
        raise DescriptorError(f"segment type {segment.type} or dpl {segment.dpl} out of range")
    base = segment.base
    low = Descriptor.pack(
        (raw_limit & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | segment.type << _TYPE_SHIFT
        | bool(segment.s) << _S_BIT
        | segment.dpl << _DPL_SHIFT
        | bool(segment.present) << _PRESENT_BIT
        | (raw_limit >> 16) << _LIMIT_HIGH_SHIFT
        | bool(segment.avl) << _AVL_BIT
        | bool(segment.l) << _L_BIT
        | bool(segment.db) << _DB_BIT
        | bool(segment.g) << _G_BIT
        | ((base >> 24) & 0xFF) << 56
    )
    if segment.s:
        return low
    return low + SystemDescriptorHigh.pack(base >> 32, 0)


def decode_segment(data: bytes, selector: int) -> Segment:
    """The inverse of :func:`encode_segment`; ``data`` holds at least one descriptor.

    A system descriptor (S bit clear) needs 16 bytes. ``selector`` is recorded as given.
    """
    if len(data) < 8:
        raise DescriptorError(f"a descriptor is 8 bytes, got {len(data)}")
    (raw,) = Descriptor.unpack_from(data)
    raw_limit = (raw & 0xFFFF) | ((raw >> _LIMIT_HIGH_SHIFT) & 0xF) << 16
    base = ((raw >> 16) & 0xFF_FFFF) | ((raw >> 56) & 0xFF) << 24
    s = bool(raw >> _S_BIT & 1)
    g = bool(raw >> _G_BIT & 1)
    if not s:
        if len(data) < 16:
            raise DescriptorError(f"a long-mode system descriptor is 16 bytes, got {len(data)}")
        base |= SystemDescriptorHigh.unpack_from(data, 8)[0] << 32
    return Segment(
        base=base,
        limit=(raw_limit << 12) | 0xFFF if g else raw_limit,
        selector=selector,
        type=(raw >> _TYPE_SHIFT) & 0xF,
        present=bool(raw >> _PRESENT_BIT & 1),
        dpl=(raw >> _DPL_SHIFT) & 0x3,
        db=bool(raw >> _DB_BIT & 1),
        s=s,
        l=bool(raw >> _L_BIT & 1),
        g=g,
        avl=bool(raw >> _AVL_BIT & 1),
    )


def build_gdt(segments: Iterable[Segment]) -> bytes:
    """A GDT holding each segment at its selector's index; unused slots are null.

    The table's length (limit + 1) ends at the last descriptor. Selector 0 is reserved
    for the null descriptor.

    :raises DescriptorError: a selector is 0, has TI or RPL bits set, or overlaps another.
    """
    table = bytearray()
    used: set[int] = set()
    for segment in segments:
        if segment.selector == 0 or segment.selector & 0x7:
            raise DescriptorError(
                f"selector 0x{segment.selector:x} must be a nonzero GDT index (TI=0, RPL=0)"
            )
        descriptor = encode_segment(segment)
        slots = set(range(segment.selector, segment.selector + len(descriptor), 8))
        if used & slots:
            raise DescriptorError(f"selector 0x{segment.selector:x} overlaps another descriptor")
        used |= slots
        end = segment.selector + len(descriptor)
        if len(table) < end:
            table.extend(bytes(end - len(table)))
        table[segment.selector:end] = descriptor
    return bytes(table)


#: Flat 4 GiB 64-bit code segment: ``__BOOT_CS``.
BOOT_CODE_SEGMENT: Final = Segment(
    base=0,
    limit=0xFFFF_FFFF,
    selector=BOOT_CODE_SELECTOR,
    type=TYPE_CODE_EXEC_READ_ACCESSED,
    l=True,
    g=True,
)
#: Flat 4 GiB read/write data segment: ``__BOOT_DS``, loaded into DS, ES, FS, GS and SS.
BOOT_DATA_SEGMENT: Final = Segment(
    base=0,
    limit=0xFFFF_FFFF,
    selector=BOOT_DATA_SELECTOR,
    type=TYPE_DATA_READ_WRITE_ACCESSED,
    db=True,
    g=True,
)
#: The boot TSS at :data:`~.layout.BOOT_TSS_ADDRESS`, busy because TR holds it.
BOOT_TSS_SEGMENT: Final = Segment(
    base=BOOT_TSS_ADDRESS,
    limit=TSS64_SIZE - 1,
    selector=BOOT_TSS_SELECTOR,
    type=TYPE_TSS64_BUSY,
    s=False,
)
BOOT_SEGMENTS: Final = (BOOT_CODE_SEGMENT, BOOT_DATA_SEGMENT, BOOT_TSS_SEGMENT)


def boot_gdt() -> bytes:
    """The boot GDT: null, null, __BOOT_CS, __BOOT_DS, TSS (48 bytes)."""
    return build_gdt(BOOT_SEGMENTS)
