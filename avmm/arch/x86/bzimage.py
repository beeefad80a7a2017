"""The Linux/x86 bzImage format: the real-mode setup header and the protected-mode payload.

A bzImage is ``(setup_sects + 1) * 512`` bytes of real-mode setup code (the first sector
holds the setup header at 0x1f1) followed by the protected-mode code, which is loaded at
1 MiB and, on x86-64, entered in 64-bit mode at offset 0x200 (boot protocol 2.12+,
``XLF_KERNEL_64``). avmm never runs the real-mode setup code; it only copies the header
into the zero page (see :mod:`.boot_params`).

Field names and offsets follow Documentation/arch/x86/boot.rst.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..._packed import Fields, Packed
from ...errors import BootError
from .layout import KERNEL_LOAD_ADDRESS, align_up

#: Offset of the setup header inside the image (and inside the zero page).
SETUP_HEADER_OFFSET: Final = 0x1F1
SETUP_HEADER_MAGIC: Final = b"HdrS"
BOOT_FLAG: Final = 0xAA55
#: The oldest protocol with ``xloadflags`` and the 64-bit entry point.
MIN_PROTOCOL_VERSION: Final = 0x020C

# loadflags (0x211)
LOADED_HIGH: Final = 1 << 0
KASLR_FLAG: Final = 1 << 1
QUIET_FLAG: Final = 1 << 5
KEEP_SEGMENTS: Final = 1 << 6
CAN_USE_HEAP: Final = 1 << 7

# xloadflags (0x236)
XLF_KERNEL_64: Final = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G: Final = 1 << 1
XLF_EFI_HANDOVER_32: Final = 1 << 2
XLF_EFI_HANDOVER_64: Final = 1 << 3
XLF_EFI_KEXEC: Final = 1 << 4
XLF_5LEVEL: Final = 1 << 5
XLF_5LEVEL_ENABLED: Final = 1 << 6

#: struct setup_header as it lies at 0x1f1, through ``kernel_info_offset`` (protocol 2.15).
#: Fields newer than a kernel's protocol version hold whatever its setup code has there;
#: :func:`parse_bzimage` zeroes the bytes past the header's declared end. struct, not
#: construct: the header is parsed on ``avmm up``'s way to the guest's first byte (see
#: ._packed).
SetupHeader = Packed(
    ("setup_sects", "B"),  # 0x1f1
    ("root_flags", "H"),  # 0x1f2
    ("syssize", "I"),  # 0x1f4, protected-mode size in 16-byte paragraphs
    ("ram_size", "H"),  # 0x1f8, obsolete
    ("vid_mode", "H"),  # 0x1fa
    ("root_dev", "H"),  # 0x1fc
    ("boot_flag", "H"),  # 0x1fe, 0xAA55
    ("jump", "H"),  # 0x200, short jmp; its second byte gives the header's end
    ("header", "4s"),  # 0x202, "HdrS"
    ("version", "H"),  # 0x206
    ("realmode_swtch", "I"),  # 0x208
    ("start_sys_seg", "H"),  # 0x20c, obsolete
    ("kernel_version", "H"),  # 0x20e, pointer to the version string - 0x200
    ("type_of_loader", "B"),  # 0x210
    ("loadflags", "B"),  # 0x211
    ("setup_move_size", "H"),  # 0x212
    ("code32_start", "I"),  # 0x214
    ("ramdisk_image", "I"),  # 0x218
    ("ramdisk_size", "I"),  # 0x21c
    ("bootsect_kludge", "I"),  # 0x220, obsolete
    ("heap_end_ptr", "H"),  # 0x224
    ("ext_loader_ver", "B"),  # 0x226
    ("ext_loader_type", "B"),  # 0x227
    ("cmd_line_ptr", "I"),  # 0x228
    ("initrd_addr_max", "I"),  # 0x22c
    ("kernel_alignment", "I"),  # 0x230
    ("relocatable_kernel", "B"),  # 0x234
    ("min_alignment", "B"),  # 0x235, log2
    ("xloadflags", "H"),  # 0x236
    ("cmdline_size", "I"),  # 0x238, max length without the NUL
    ("hardware_subarch", "I"),  # 0x23c
    ("hardware_subarch_data", "Q"),  # 0x240
    ("payload_offset", "I"),  # 0x248
    ("payload_length", "I"),  # 0x24c
    ("setup_data", "Q"),  # 0x250
    ("pref_address", "Q"),  # 0x258
    ("init_size", "I"),  # 0x260
    ("handover_offset", "I"),  # 0x264
    ("kernel_info_offset", "I"),  # 0x268
)
#: Bytes from 0x1f1 to the end of ``kernel_info_offset`` (0x26c).
SETUP_HEADER_SIZE: Final = SetupHeader.size


def header_end(image: bytes) -> int:
    """The image offset just past the setup header: 0x202 + the jump's displacement byte."""
    return 0x202 + image[0x201]


@dataclass(frozen=True)
class BzImage:
    """A parsed, validated bzImage.

    ``header_bytes`` is the raw header from 0x1f1 to ``SETUP_HEADER_OFFSET +
    SETUP_HEADER_SIZE``, with the bytes past the header's declared end zeroed: exactly what
    the boot loader copies into the zero page. ``payload`` is the protected-mode code
    (``syssize * 16`` bytes) to be loaded at ``load_address``; ``trailing_bytes`` counts
    what the file holds after it (Debian appends an Authenticode signature there).
    """

    header: Fields  # of SetupHeader
    header_bytes: bytes
    setup_size: int
    payload: bytes
    trailing_bytes: int
    version_string: str

    load_address: int = KERNEL_LOAD_ADDRESS

    @property
    def protocol_version(self) -> int:
        return int(self.header.version)

    @property
    def protocol_version_str(self) -> str:
        version = self.protocol_version
        return f"{version >> 8}.{version & 0xFF:02d}"

    @property
    def initrd_addr_max(self) -> int:
        """Highest address the initrd may occupy (inclusive)."""
        return int(self.header.initrd_addr_max)

    @property
    def cmdline_size(self) -> int:
        """Longest command line the kernel accepts, excluding the terminating NUL."""
        return int(self.header.cmdline_size)

    @property
    def kernel_alignment(self) -> int:
        return int(self.header.kernel_alignment)

    @property
    def pref_address(self) -> int:
        return int(self.header.pref_address)

    @property
    def init_size(self) -> int:
        return int(self.header.init_size)

    @property
    def relocatable_kernel(self) -> bool:
        return bool(self.header.relocatable_kernel)

    @property
    def xloadflags(self) -> int:
        return int(self.header.xloadflags)

    @property
    def entry_point(self) -> int:
        """The 64-bit entry point: start of the protected-mode code + 0x200."""
        return self.load_address + 0x200

    def runtime_range(self) -> tuple[int, int]:
        """``[start, end)`` of the memory the kernel uses for decompressing itself.

        The 64-bit entry of the compressed kernel works in ``init_size`` bytes starting at
        its load address rounded up to ``kernel_alignment`` when it is relocatable, but
        never below ``pref_address`` (LOAD_PHYSICAL_ADDR); a kernel that is not
        relocatable always uses ``pref_address``. This whole range must be RAM and must not
        hold anything the kernel needs later (the initrd).
        """
        if self.relocatable_kernel:
            start = max(align_up(self.load_address, self.kernel_alignment), self.pref_address)
        else:
            start = self.pref_address
        return start, start + self.init_size

    def image_end(self) -> int:
        """First address past everything the kernel occupies: payload and runtime area."""
        return max(self.load_address + len(self.payload), self.runtime_range()[1])


def is_bzimage(data: bytes) -> bool:
    """True when ``data`` carries the setup-header magic at 0x202."""
    return data[0x202:0x206] == SETUP_HEADER_MAGIC


def parse_bzimage(data: bytes, *, name: str = "kernel image") -> BzImage:
    """Parse and validate a bzImage that avmm can boot through the 64-bit entry point.

    ``name`` (usually the file's path) prefixes every error message.

    :raises BootError: the image is truncated, lacks the ``HdrS`` magic or the 0xAA55 boot
        flag, speaks a boot protocol older than 2.12, or has no 64-bit entry point.
    """
    end_of_header = SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE
    if len(data) < end_of_header:
        raise BootError(
            f"{name}: {len(data)} bytes is too short for a bzImage "
            f"(the setup header alone ends at 0x{end_of_header:x})"
        )
    if data[0x202:0x206] != SETUP_HEADER_MAGIC:
        raise BootError(
            f"{name}: not a bzImage: no 'HdrS' magic at 0x202 (found {data[0x202:0x206]!r})"
        )
    raw = SetupHeader.parse(data, SETUP_HEADER_OFFSET)
    if raw.boot_flag != BOOT_FLAG:
        raise BootError(f"{name}: bad boot flag 0x{raw.boot_flag:04x} at 0x1fe (want 0xaa55)")
    if raw.version < MIN_PROTOCOL_VERSION:
        raise BootError(
            f"{name}: boot protocol {raw.version >> 8}.{raw.version & 0xFF:02d} is too old; "
            "avmm needs 2.12 or newer for the 64-bit entry point"
        )
    if not raw.xloadflags & XLF_KERNEL_64:
        raise BootError(
            f"{name}: the kernel has no 64-bit entry point (XLF_KERNEL_64 is clear in "
            f"xloadflags 0x{raw.xloadflags:x}); avmm boots 64-bit kernels only"
        )

    # Bytes past the header's declared end belong to the setup code, not the header.
    declared_end = min(header_end(data), end_of_header)
    header_bytes = bytearray(data[SETUP_HEADER_OFFSET:end_of_header])
    header_bytes[declared_end - SETUP_HEADER_OFFSET:] = bytes(end_of_header - declared_end)
    header = SetupHeader.parse(header_bytes)

    # setup_sects == 0 means 4 for compatibility with ancient images.
    setup_size = ((header.setup_sects or 4) + 1) * 512
    payload_size = header.syssize * 16
    if payload_size == 0:
        raise BootError(f"{name}: syssize is 0: the image has no protected-mode code")
    if len(data) < setup_size + payload_size:
        raise BootError(
            f"{name}: truncated: {len(data)} bytes, but the setup code ({setup_size} bytes) "
            f"and the protected-mode code ({payload_size} bytes) need "
            f"{setup_size + payload_size}"
        )
    if header.relocatable_kernel and (
        header.kernel_alignment == 0 or header.kernel_alignment & (header.kernel_alignment - 1)
    ):
        raise BootError(
            f"{name}: kernel_alignment 0x{header.kernel_alignment:x} is not a power of two"
        )

    return BzImage(
        header=header,
        header_bytes=bytes(header_bytes),
        setup_size=setup_size,
        payload=bytes(data[setup_size:setup_size + payload_size]),
        trailing_bytes=len(data) - setup_size - payload_size,
        version_string=_version_string(data, header.kernel_version, setup_size),
    )


def _version_string(data: bytes, pointer: int, setup_size: int) -> str:
    # kernel_version points (minus 0x200) at a NUL-terminated string inside the setup code.
    if pointer == 0:
        return ""
    start = pointer + 0x200
    if start >= setup_size:
        return ""
    raw = data[start:min(setup_size, start + 256)].split(b"\0", 1)[0]
    return raw.decode("ascii", "replace")
