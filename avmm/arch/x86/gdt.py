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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import construct as c

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


# The 8-byte code/data descriptor (and the low half of a system descriptor). BitStruct
# reads bits most significant first, so the fields are listed from bit 63 down to bit 0
# and ByteSwapped turns the little-endian 8 bytes into that big-endian bit order.
_Descriptor = c.BitStruct(
    "base_high" / c.BitsInteger(8),
    "g" / c.Flag,
    "db" / c.Flag,
    "l" / c.Flag,
    "avl" / c.Flag,
    "limit_high" / c.BitsInteger(4),
    "present" / c.Flag,
    "dpl" / c.BitsInteger(2),
    "s" / c.Flag,
    "type" / c.BitsInteger(4),
    "base_mid" / c.BitsInteger(8),
    "base_low" / c.BitsInteger(16),
    "limit_low" / c.BitsInteger(16),
)
Descriptor = c.ByteSwapped(_Descriptor)
#: Upper half of a 16-byte long-mode system descriptor.
SystemDescriptorHigh = c.Struct("base_upper" / c.Int32ul, "reserved" / c.Int32ul)


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
    low = Descriptor.build(
        {
            "base_high": (segment.base >> 24) & 0xFF,
            "g": segment.g,
            "db": segment.db,
            "l": segment.l,
            "avl": segment.avl,
            "limit_high": raw_limit >> 16,
            "present": segment.present,
            "dpl": segment.dpl,
            "s": segment.s,
            "type": segment.type,
            "base_mid": (segment.base >> 16) & 0xFF,
            "base_low": segment.base & 0xFFFF,
            "limit_low": raw_limit & 0xFFFF,
        }
    )
    if segment.s:
        return low
    return low + SystemDescriptorHigh.build({"base_upper": segment.base >> 32, "reserved": 0})


def decode_segment(data: bytes, selector: int) -> Segment:
    """The inverse of :func:`encode_segment`; ``data`` holds at least one descriptor.

    A system descriptor (S bit clear) needs 16 bytes. ``selector`` is recorded as given.
    """
    if len(data) < 8:
        raise DescriptorError(f"a descriptor is 8 bytes, got {len(data)}")
    fields = Descriptor.parse(bytes(data[:8]))
    raw_limit = (fields.limit_high << 16) | fields.limit_low
    base = (fields.base_high << 24) | (fields.base_mid << 16) | fields.base_low
    if not fields.s:
        if len(data) < 16:
            raise DescriptorError(f"a long-mode system descriptor is 16 bytes, got {len(data)}")
        base |= SystemDescriptorHigh.parse(bytes(data[8:16])).base_upper << 32
    return Segment(
        base=base,
        limit=(raw_limit << 12) | 0xFFF if fields.g else raw_limit,
        selector=selector,
        type=fields.type,
        present=fields.present,
        dpl=fields.dpl,
        db=fields.db,
        s=fields.s,
        l=fields.l,
        g=fields.g,
        avl=fields.avl,
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
