"""Load a kernel (bzImage or ELF), its command line and initrd into guest memory.

:func:`load_kernel` is the one entry point: it checks everything first and only then
writes, so a :class:`~avmm.errors.BootError` leaves guest memory untouched. It writes the
kernel, the initrd, the command line, the zero page, the boot page tables, the GDT, the
(empty) IDT and the TSS at the addresses in :mod:`.layout` -- and, when given, the ACPI
tables (:mod:`.acpi`) -- and returns the boot CPU state together with what it placed
where, for logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ...errors import BootError
from ...memory import GuestMemory
from .acpi import AcpiTables
from .boot_cpu import BootCpuState, boot_cpu_state
from .boot_params import E820Entry, build_e820, build_zero_page, minimal_setup_header
from .bzimage import BzImage, is_bzimage, parse_bzimage
from .elf import ElfImage, is_elf, parse_elf
from .gdt import TSS64_SIZE, boot_gdt
from .layout import (
    BIOS_ROM_START,
    BOOT_GDT_ADDRESS,
    BOOT_IDT_ADDRESS,
    BOOT_TSS_ADDRESS,
    CMDLINE_ADDRESS,
    CMDLINE_MAX_SIZE,
    DEFAULT_INITRD_ADDR_MAX,
    HIGH_MEMORY_START,
    IDENTITY_MAP_END,
    INITRD_ALIGNMENT,
    KERNEL_LOAD_ADDRESS,
    LOW_MEMORY_END,
    MIB,
    ZERO_PAGE_ADDRESS,
    align_down,
    align_up,
)
from .pagetables import write_identity_map

#: x86 Linux's COMMAND_LINE_SIZE (NUL included): the limit of a Linux ELF vmlinux, whose
#: file, unlike a bzImage's setup header, does not say it.
LINUX_COMMAND_LINE_SIZE = 2048


@dataclass(frozen=True)
class KernelLoad:
    """What :func:`load_kernel` did.

    ``kernel_range`` is ``[start, end)`` of the bytes written for the kernel;
    ``kernel_footprint`` also covers the memory the kernel will claim at run time (a
    bzImage decompresses into ``init_size`` bytes at ``pref_address``); the initrd lies
    above it. Ranges are half-open guest physical address pairs.
    """

    kind: Literal["bzimage", "elf"]
    cpu: BootCpuState
    entry: int
    kernel_range: tuple[int, int]
    kernel_footprint: tuple[int, int]
    initrd_range: tuple[int, int] | None
    cmdline: str
    cmdline_address: int
    zero_page_address: int
    e820: tuple[E820Entry, ...]
    #: bzImage: the protocol version, e.g. "2.15"; ELF: "".
    protocol: str = ""
    #: bzImage: the kernel's version string; ELF: "".
    version: str = ""
    #: ELF: the Xen PVH 32-bit entry point, if the image has the note (not used).
    pvh_entry: int | None = None
    #: Where the ACPI RSDP was written (and ``acpi_rsdp_addr`` points), or None.
    acpi_rsdp_address: int | None = None

    def log_fields(self) -> dict[str, Any]:
        """Key-value fields for one structlog line about the load."""
        fields: dict[str, Any] = {
            "kind": self.kind,
            "entry": f"0x{self.entry:x}",
            "kernel": _format_range(self.kernel_range),
            "footprint": _format_range(self.kernel_footprint),
            "initrd": _format_range(self.initrd_range) if self.initrd_range else None,
            "cmdline": self.cmdline,
        }
        if self.version:
            fields["version"] = self.version
            fields["protocol"] = self.protocol
        if self.pvh_entry is not None:
            fields["pvh_entry"] = f"0x{self.pvh_entry:x}"
        if self.acpi_rsdp_address is not None:
            fields["acpi_rsdp"] = f"0x{self.acpi_rsdp_address:x}"
        return fields


def load_kernel(
    memory: GuestMemory,
    kernel: bytes | Path,
    *,
    cmdline: str,
    initrd: bytes | Path | None = None,
    acpi: AcpiTables | None = None,
    kernel_name: str | None = None,
    initrd_name: str | None = None,
    cmdline_note: str = "",
) -> KernelLoad:
    """Load ``kernel`` for a 64-bit boot and prepare everything the boot CPU needs.

    The format is detected from the contents: ``\\x7fELF`` is an ELF image, ``HdrS`` at
    0x202 a bzImage. The initrd is placed page-aligned as high as possible below both the
    kernel's ``initrd_addr_max`` and the top of RAM below the MMIO hole, above the
    kernel's footprint. ``cmdline`` is written NUL-terminated at
    :data:`~.layout.CMDLINE_ADDRESS`.

    With ``acpi``, its blob is written at its ``base_address`` (in [0xa0000, 1 MiB),
    normally 0xe0000), ``boot_params.acpi_rsdp_addr`` points at the RSDP (for bzImage
    and ELF kernels alike: the field is in the zero page, not the setup header), and the
    e820 map reports ``[base_address, 1 MiB)`` as reserved.

    The command line's limit is the kernel's own where the image says it (a bzImage's
    ``cmdline_size``; 2047 for an ELF ``vmlinux`` with Linux's ELF notes) and otherwise
    avmm's room for it (65535 bytes). ``cmdline_note`` is added to the error message
    when the command line is too long (say what avmm added to it).

    :raises BootError: unreadable file, unknown or malformed image, an image or initrd
        that does not fit guest RAM, or a command line that is too long. Messages name the
        file (``kernel_name``/``initrd_name``, else the Path given).
    """
    if kernel_name is None:
        kernel_name = str(kernel) if isinstance(kernel, Path) else "kernel image"
    kernel_data = _read(kernel, "kernel")
    if initrd_name is None:
        initrd_name = str(initrd) if isinstance(initrd, Path) else "initrd"
    initrd_data = None if initrd is None else _read(initrd, "initrd")

    low_ram_end = _low_ram_end(memory)
    image: BzImage | ElfImage
    if is_elf(kernel_data):
        image = parse_elf(kernel_data, name=kernel_name)
        _check_elf_fits(image, memory, kernel_name)
        kind: Literal["bzimage", "elf"] = "elf"
        entry = image.entry
        kernel_range = footprint = image.image_range()
        setup_header = minimal_setup_header()
        cmdline_limit = CMDLINE_MAX_SIZE - 1
        limit_source = "avmm's own limit: a non-Linux ELF image states none"
        if any(note.name == b"Linux" for note in image.notes):
            cmdline_limit = LINUX_COMMAND_LINE_SIZE - 1
            limit_source = "Linux's COMMAND_LINE_SIZE"
        initrd_addr_max = DEFAULT_INITRD_ADDR_MAX
    elif is_bzimage(kernel_data):
        image = parse_bzimage(kernel_data, name=kernel_name)
        _check_bzimage_fits(image, low_ram_end, kernel_name)
        kind = "bzimage"
        entry = image.entry_point
        kernel_range = (image.load_address, image.load_address + len(image.payload))
        footprint = (image.load_address, image.image_end())
        setup_header = image.header_bytes
        cmdline_limit = image.cmdline_size
        limit_source = "its cmdline_size"
        initrd_addr_max = image.initrd_addr_max
    else:
        raise BootError(
            f"{kernel_name}: unknown kernel format: neither an ELF file nor a bzImage "
            "(no '\\x7fELF' at offset 0, no 'HdrS' at 0x202)"
        )

    cmdline_bytes = _encode_cmdline(cmdline, kernel_limit=cmdline_limit, note=cmdline_note,
                                    limit_source=limit_source)

    initrd_range = None
    if initrd_data is not None:
        start = place_initrd(
            len(initrd_data),
            low_ram_end=low_ram_end,
            initrd_addr_max=initrd_addr_max,
            kernel_end=footprint[1],
            name=initrd_name,
        )
        initrd_range = (start, start + len(initrd_data))

    firmware_start = BIOS_ROM_START
    if acpi is not None:
        _check_acpi_fits(acpi)
        firmware_start = min(firmware_start, acpi.base_address)
    e820 = build_e820(memory.regions, firmware_start=firmware_start)
    zero_page = build_zero_page(
        setup_header=setup_header,
        e820=e820,
        cmdline_address=CMDLINE_ADDRESS,
        initrd_address=initrd_range[0] if initrd_range else 0,
        initrd_size=len(initrd_data) if initrd_data is not None else 0,
        acpi_rsdp_address=acpi.rsdp_address if acpi is not None else 0,
    )
    gdt = boot_gdt()

    # Everything is checked; from here on only writes.
    if isinstance(image, ElfImage):
        for segment in image.segments:
            memory.write(segment.paddr, segment.data)
            bss = segment.memsz - len(segment.data)
            if bss:
                memory.view(segment.paddr + len(segment.data), bss)[:] = bytes(bss)
    else:
        memory.write(image.load_address, image.payload)
    if initrd_data is not None and initrd_range is not None:
        memory.write(initrd_range[0], initrd_data)
    memory.write(CMDLINE_ADDRESS, cmdline_bytes)
    memory.write(ZERO_PAGE_ADDRESS, zero_page)
    memory.write(BOOT_GDT_ADDRESS, gdt)
    memory.write(BOOT_IDT_ADDRESS, bytes(8))
    memory.write(BOOT_TSS_ADDRESS, bytes(TSS64_SIZE))
    if acpi is not None:
        memory.write(acpi.base_address, acpi.blob)
    cr3 = write_identity_map(memory)

    return KernelLoad(
        kind=kind,
        cpu=boot_cpu_state(entry=entry, gdt_limit=len(gdt) - 1, cr3=cr3),
        entry=entry,
        kernel_range=kernel_range,
        kernel_footprint=footprint,
        initrd_range=initrd_range,
        cmdline=cmdline,
        cmdline_address=CMDLINE_ADDRESS,
        zero_page_address=ZERO_PAGE_ADDRESS,
        e820=e820,
        protocol=image.protocol_version_str if isinstance(image, BzImage) else "",
        version=image.version_string if isinstance(image, BzImage) else "",
        pvh_entry=image.pvh_entry if isinstance(image, ElfImage) else None,
        acpi_rsdp_address=acpi.rsdp_address if acpi is not None else None,
    )


def place_initrd(
    size: int,
    *,
    low_ram_end: int,
    initrd_addr_max: int,
    kernel_end: int,
    name: str = "initrd",
) -> int:
    """The start address for an initrd of ``size`` bytes.

    As high as possible, page-aligned, ending at or below both ``low_ram_end`` and
    ``initrd_addr_max + 1`` (the field names the last byte the initrd may occupy), and
    starting at or above ``kernel_end`` rounded up to a page.

    :raises BootError: ``size`` is 0 or the initrd does not fit.
    """
    if size <= 0:
        raise BootError(f"{name}: the initrd is empty")
    ceiling = min(low_ram_end, initrd_addr_max + 1)
    floor = align_up(kernel_end, INITRD_ALIGNMENT)
    start = align_down(ceiling - size, INITRD_ALIGNMENT)
    if ceiling - size < 0 or start < floor:
        raise BootError(
            f"{name}: {size} bytes ({size / MIB:.1f} MiB) do not fit between the kernel's "
            f"end at 0x{floor:x} and 0x{ceiling:x} (the lower of the top of RAM below "
            f"the MMIO hole and the kernel's initrd_addr_max 0x{initrd_addr_max:x}); "
            "give the guest more memory or use a smaller initrd"
        )
    return start


def _read(source: bytes | Path, what: str) -> bytes:
    if isinstance(source, Path):
        try:
            return source.read_bytes()
        except OSError as e:
            raise BootError(f"{source}: cannot read the {what}: {e.strerror or e}") from e
    return bytes(source)


def _low_ram_end(memory: GuestMemory) -> int:
    first = memory.regions[0]
    if first.guest_address != 0:
        raise BootError("guest RAM must start at address 0 to boot a kernel")
    return first.end


def _check_bzimage_fits(image: BzImage, low_ram_end: int, name: str) -> None:
    payload_end = image.load_address + len(image.payload)
    if payload_end > low_ram_end:
        raise BootError(
            f"{name}: the kernel's {len(image.payload)} bytes at 0x{image.load_address:x} "
            f"end at 0x{payload_end:x}, past the end of RAM (0x{low_ram_end:x})"
        )
    start, end = image.runtime_range()
    if end > low_ram_end:
        raise BootError(
            f"{name}: the kernel needs RAM up to 0x{end:x} to decompress itself "
            f"(init_size 0x{image.init_size:x} from 0x{start:x}), but the guest has RAM "
            f"only up to 0x{low_ram_end:x} below the MMIO hole; give it at least "
            f"{-(-end // MIB)} MiB"
        )


def _check_elf_fits(image: ElfImage, memory: GuestMemory, name: str) -> None:
    for index, segment in enumerate(image.segments):
        where = f"0x{segment.paddr:x}..0x{segment.end:x}"
        if segment.paddr < KERNEL_LOAD_ADDRESS:
            raise BootError(
                f"{name}: PT_LOAD segment {index} at {where} lies below 1 MiB, where avmm "
                "keeps the zero page, page tables and command line; link the kernel at "
                "1 MiB or higher"
            )
        if not memory.contains(segment.paddr, segment.memsz):
            ram = ", ".join(f"0x{r.guest_address:x}..0x{r.end:x}" for r in memory.regions)
            raise BootError(
                f"{name}: PT_LOAD segment {index} at {where} is outside guest RAM ({ram})"
            )
    if image.entry >= IDENTITY_MAP_END:
        raise BootError(
            f"{name}: entry point 0x{image.entry:x} is above 4 GiB, outside the boot "
            "page tables' identity map"
        )


def _check_acpi_fits(acpi: AcpiTables) -> None:
    if not LOW_MEMORY_END <= acpi.base_address < acpi.end <= HIGH_MEMORY_START:
        raise BootError(
            f"the ACPI tables at 0x{acpi.base_address:x}..0x{acpi.end:x} must lie in the "
            f"firmware area [0x{LOW_MEMORY_END:x}, 0x{HIGH_MEMORY_START:x})"
        )


def _encode_cmdline(cmdline: str, *, kernel_limit: int, note: str = "",
                    limit_source: str = "its cmdline_size") -> bytes:
    if "\0" in cmdline:
        raise BootError("the kernel command line must not contain a NUL character")
    encoded = cmdline.encode()
    layout_limit = CMDLINE_MAX_SIZE - 1
    if len(encoded) > min(kernel_limit, layout_limit):
        raise BootError(
            f"the kernel command line is {len(encoded)} bytes{note}; the kernel accepts at "
            f"most {kernel_limit} ({limit_source}) and avmm reserves room for "
            f"{layout_limit} (plus the NUL); shorten boot.cmdline"
        )
    return encoded + b"\0"


def _format_range(value: tuple[int, int]) -> str:
    return f"0x{value[0]:x}..0x{value[1]:x}"
