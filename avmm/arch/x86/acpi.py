"""ACPI tables for an x86 microVM: RSDP, XSDT, FADT, MADT and a DSDT.

A stock distro kernel without ``VIRTIO_MMIO_CMDLINE_DEVICES`` finds virtio-mmio devices
only through ACPI. :func:`build_acpi_tables` lays out, from one guest physical address::

    RSDP (36 bytes, revision 2)  -> XSDT
    XSDT                         -> FADT, MADT
    FADT (revision 6)            -> DSDT (both the 32-bit DSDT and the 64-bit X_DSDT)
    MADT                         one Local APIC per vCPU, the I/O APIC, IRQ0 -> GSI 2
    DSDT                         \\_S5_, \\_SB.COM1 (PNP0501), \\_SB.VRnn (LNRO0005) per device

Choices, with the reasons (ACPI 6.x and what Linux does with each field):

- **Where.** :data:`ACPI_TABLES_ADDRESS` = 0xE0000: the RSDP first, 16-byte aligned, so
  that a guest that scans the BIOS area 0xE0000..0xFFFFF (Linux's
  ``acpi_find_root_pointer``, also the early code in ``boot/compressed``) finds it; the
  other tables follow in [0xE0000, 0xF0000) (:data:`ACPI_TABLES_END`), leaving
  0xF0000..1 MiB to an MP table. Everything lies below 1 MiB, under the kernel, and
  clear of the boot structures in ``layout.py``. The loader should also set
  ``boot_params.acpi_rsdp_addr`` (protocol 2.14+) and report [0xE0000, 1 MiB) as
  reserved in the e820 map.
- **Hardware-reduced ACPI.** The FADT sets ``HW_REDUCED_ACPI``: no PM1/PM2/GPE/PM timer
  blocks, no SMI command port, SCI_INT 0, no FACS. Linux then skips the legacy PIC
  (``null_legacy_pic``) and the PIT/HPET timer init and uses the LAPIC timer. The reset
  register is left empty (``RESET_REG_SUP`` clear): Linux's default reboot falls
  through ACPI to the keyboard controller pulse (0xFE to port 0x64), which avmm's i8042
  model handles. Power-off goes through the hardware-reduced sleep registers: the FADT's
  ``SLEEP_CONTROL_REG``/``SLEEP_STATUS_REG`` are the two SystemIO bytes at
  :data:`ACPI_SLEEP_CONTROL_PORT` (avmm's :class:`~avmm.devices.acpi_sleep.AcpiSleep`)
  and the DSDT's ``\\_S5_`` package gives SLP_TYP :data:`S5_SLEEP_TYPE`; Linux needs both
  registers and ``\\_S5_`` before it installs ACPI power-off, then writes
  ``SLP_TYP << 2 | SLP_EN`` to the control register. ``IAPC_BOOT_ARCH`` says: no VGA, no
  CMOS RTC (avmm has neither), and leaves the 8042 bit clear so that Linux does not
  probe a keyboard controller that only implements reset.
- **MADT.** Local APIC at 0xFEE00000; ``PCAT_COMPAT`` clear: a hardware-reduced guest
  is not meant to use the 8259 (Linux installs ``null_legacy_pic`` and leaves LINT0
  masked, so KVM's in-kernel PIC never reaches it). Processor UID n and APIC ID n for
  vCPU n (KVM's default APIC IDs), all enabled. One I/O APIC, ID 0, at 0xFEC00000, GSI
  base 0 (KVM's 24-pin IOAPIC). One Interrupt Source Override, ISA IRQ 0 -> GSI 2,
  flags "conforms to the bus" (edge, active high): the PC convention for the PIT. A
  hardware-reduced Linux does not set up the PIT as its timer, so the override only
  matters to a guest that does; such a guest also needs the VM to route GSI 2 to the
  PIT (KVM's default routing sends the PIT's IRQ 0 to IOAPIC pin 0). The virtio and
  UART lines are ISA IRQs 3..15 used edge triggered, active high -- the ISA default --
  so they need no override; their ``_CRS`` says the same.
- **Virtio-mmio devices.** Linux's ``virtio_mmio`` driver matches ``_HID``
  ``"LNRO0005"`` and takes its first memory resource (the register window) and its first
  interrupt, requested with ``IRQF_SHARED`` and handled as an edge: avmm signals it with
  an irqfd, i.e. a pulse. Each device gets ``_UID`` n, a ``Memory32Fixed`` of the
  window and an ``Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive)``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from ..._packed import Packed
from . import aml
from .layout import BIOS_ROM_START, HIGH_MEMORY_START, IOAPIC_ADDRESS, LAPIC_ADDRESS

# -- where the tables go ------------------------------------------------------------------

#: Start of the BIOS area a guest scans for the RSDP (on 16-byte boundaries).
RSDP_SCAN_START: Final = 0xE0000
#: End (exclusive) of the RSDP scan area.
RSDP_SCAN_END: Final = HIGH_MEMORY_START
#: Where avmm puts the ACPI tables: the RSDP here, the others right after it.
ACPI_TABLES_ADDRESS: Final = RSDP_SCAN_START
#: The tables must end at or below this address (0xF0000 onward is left to an MP table).
ACPI_TABLES_END: Final = BIOS_ROM_START
#: Alignment of every table. The RSDP must be 16-byte aligned to be found by a scan.
TABLE_ALIGNMENT: Final = 16

# -- identification -----------------------------------------------------------------------

OEM_ID: Final = b"AVMM  "
OEM_TABLE_ID: Final = b"AVMMVM  "
OEM_REVISION: Final = 1
CREATOR_ID: Final = b"AVMM"
CREATOR_REVISION: Final = 1

# -- table constants ----------------------------------------------------------------------

RSDP_SIGNATURE: Final = b"RSD PTR "
RSDP_REVISION: Final = 2
#: Bytes covered by the ACPI 1.0 checksum.
RSDP_V1_LENGTH: Final = 20
RSDP_LENGTH: Final = 36
HEADER_LENGTH: Final = 36

XSDT_REVISION: Final = 1
FADT_REVISION: Final = 6
FADT_MINOR_REVISION: Final = 5
FADT_LENGTH: Final = 276
MADT_REVISION: Final = 5
#: DSDT revision 2: AML integers are 64-bit.
DSDT_REVISION: Final = 2

# FADT Flags (ACPI 6.5 table 5.10).
FADT_PWR_BUTTON: Final = 1 << 4  # no fixed-feature power button
FADT_SLP_BUTTON: Final = 1 << 5  # no fixed-feature sleep button
FADT_HW_REDUCED_ACPI: Final = 1 << 20
FADT_FLAGS: Final = FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_HW_REDUCED_ACPI
# FADT IA-PC boot architecture flags (table 5.11).
IAPC_BOOT_ARCH_VGA_NOT_PRESENT: Final = 1 << 2
IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: Final = 1 << 5
IAPC_BOOT_ARCH: Final = IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT

# MADT.
MADT_PCAT_COMPAT: Final = 1 << 0
MADT_FLAGS: Final = 0
MADT_TYPE_LOCAL_APIC: Final = 0
MADT_TYPE_IO_APIC: Final = 1
MADT_TYPE_INTERRUPT_OVERRIDE: Final = 2
LOCAL_APIC_ENABLED: Final = 1 << 0
IOAPIC_ID: Final = 0
IOAPIC_GSI_BASE: Final = 0
#: Interrupt Source Override flags: polarity and trigger mode "conform to the bus".
MPS_INTI_CONFORMS: Final = 0
ISA_BUS: Final = 0
PIT_ISA_IRQ: Final = 0
PIT_GSI: Final = 2
#: The xAPIC limits: 8-bit APIC IDs, 0xFF is the broadcast ID.
MAX_VCPUS: Final = 254

# Hardware-reduced sleep registers (§4.8.3.7): control at the port, status right after it.
#: SystemIO port of SLEEP_CONTROL_REG (SLEEP_STATUS_REG is the next port). 0x600 is where
#: PC chipsets put their PM block; avmm has none, so it is free.
ACPI_SLEEP_CONTROL_PORT: Final = 0x600
ACPI_SLEEP_STATUS_PORT: Final = ACPI_SLEEP_CONTROL_PORT + 1
#: The SLP_TYP value \\_S5_ gives (any 3-bit value works; the device checks this one).
S5_SLEEP_TYPE: Final = 5
GAS_SYSTEM_IO: Final = 1
GAS_ACCESS_BYTE: Final = 1

# DSDT.
COM1_PORT: Final = 0x3F8
COM1_PORT_COUNT: Final = 8
COM1_IRQ: Final = 4
VIRTIO_MMIO_HID: Final = "LNRO0005"

# -- binary layouts -----------------------------------------------------------------------

# struct, not construct: the tables are built on ``avmm up``'s way to the guest's first
# byte (see ._packed). A field with a value after its code is a constant of the spec:
# build writes it unless told otherwise.

#: The RSDP, revision 2 (ACPI 6.5 §5.2.5.3).
Rsdp = Packed(
    ("signature", "8s", RSDP_SIGNATURE),
    ("checksum", "B"),
    ("oem_id", "6s"),
    ("revision", "B"),
    ("rsdt_address", "I"),
    ("length", "I"),
    ("xsdt_address", "Q"),
    ("extended_checksum", "B"),
    ("reserved", "3s"),
)

#: The header every system description table starts with (§5.2.6).
TableHeader = Packed(
    ("signature", "4s"),
    ("length", "I"),
    ("revision", "B"),
    ("checksum", "B"),
    ("oem_id", "6s"),
    ("oem_table_id", "8s"),
    ("oem_revision", "I"),
    ("creator_id", "4s"),
    ("creator_revision", "I"),
)

#: Generic Address Structure (§5.2.3.2).
GenericAddress = Packed(
    ("space_id", "B"),
    ("bit_width", "B"),
    ("bit_offset", "B"),
    ("access_size", "B"),
    ("address", "Q"),
)

#: The FADT body after the header, revision 6 (§5.2.9, 276 bytes in all).
FadtBody = Packed(
    ("firmware_ctrl", "I"),  # 36
    ("dsdt", "I"),  # 40
    ("reserved0", "B"),  # 44
    ("preferred_pm_profile", "B"),  # 45
    ("sci_int", "H"),  # 46
    ("smi_cmd", "I"),  # 48
    ("acpi_enable", "B"),  # 52
    ("acpi_disable", "B"),
    ("s4bios_req", "B"),
    ("pstate_cnt", "B"),
    ("pm1a_evt_blk", "I"),  # 56
    ("pm1b_evt_blk", "I"),
    ("pm1a_cnt_blk", "I"),
    ("pm1b_cnt_blk", "I"),
    ("pm2_cnt_blk", "I"),
    ("pm_tmr_blk", "I"),
    ("gpe0_blk", "I"),
    ("gpe1_blk", "I"),
    ("pm1_evt_len", "B"),  # 88
    ("pm1_cnt_len", "B"),
    ("pm2_cnt_len", "B"),
    ("pm_tmr_len", "B"),
    ("gpe0_blk_len", "B"),
    ("gpe1_blk_len", "B"),
    ("gpe1_base", "B"),
    ("cst_cnt", "B"),
    ("p_lvl2_lat", "H"),  # 96
    ("p_lvl3_lat", "H"),
    ("flush_size", "H"),
    ("flush_stride", "H"),
    ("duty_offset", "B"),  # 104
    ("duty_width", "B"),
    ("day_alrm", "B"),
    ("mon_alrm", "B"),
    ("century", "B"),
    ("iapc_boot_arch", "H"),  # 109
    ("reserved1", "B"),
    ("flags", "I"),  # 112
    ("reset_reg", GenericAddress),  # 116
    ("reset_value", "B"),  # 128
    ("arm_boot_arch", "H"),
    ("fadt_minor_version", "B"),  # 131
    ("x_firmware_ctrl", "Q"),  # 132
    ("x_dsdt", "Q"),  # 140
    ("x_pm1a_evt_blk", GenericAddress),  # 148
    ("x_pm1b_evt_blk", GenericAddress),
    ("x_pm1a_cnt_blk", GenericAddress),
    ("x_pm1b_cnt_blk", GenericAddress),
    ("x_pm2_cnt_blk", GenericAddress),
    ("x_pm_tmr_blk", GenericAddress),
    ("x_gpe0_blk", GenericAddress),
    ("x_gpe1_blk", GenericAddress),
    ("sleep_control_reg", GenericAddress),  # 244
    ("sleep_status_reg", GenericAddress),  # 256
    ("hypervisor_vendor_id", "Q"),  # 268
)

#: The MADT body before its interrupt controller structures (§5.2.12).
MadtBody = Packed(
    ("local_apic_address", "I"),
    ("flags", "I"),
)

MadtLocalApic = Packed(
    ("type", "B", MADT_TYPE_LOCAL_APIC),
    ("length", "B", 8),
    ("processor_uid", "B"),
    ("apic_id", "B"),
    ("flags", "I"),
)

MadtIoApic = Packed(
    ("type", "B", MADT_TYPE_IO_APIC),
    ("length", "B", 12),
    ("io_apic_id", "B"),
    ("reserved", "B", 0),
    ("address", "I"),
    ("gsi_base", "I"),
)

MadtInterruptOverride = Packed(
    ("type", "B", MADT_TYPE_INTERRUPT_OVERRIDE),
    ("length", "B", 10),
    ("bus", "B"),
    ("source", "B"),
    ("gsi", "I"),
    ("flags", "H"),
)


# -- helpers ------------------------------------------------------------------------------


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus itself sum to 0 modulo 256."""
    return -sum(data) & 0xFF


def build_table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: avmm's header (with length and checksum) + ``body``."""
    header = {
        "signature": signature,
        "length": HEADER_LENGTH + len(body),
        "revision": revision,
        "checksum": 0,
        "oem_id": OEM_ID,
        "oem_table_id": OEM_TABLE_ID,
        "oem_revision": OEM_REVISION,
        "creator_id": CREATOR_ID,
        "creator_revision": CREATOR_REVISION,
    }
    table = bytearray(TableHeader.build(header) + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


def build_rsdp(xsdt_address: int) -> bytes:
    """The 36-byte RSDP, revision 2, pointing at the XSDT (no RSDT), both checksums set."""
    fields = {
        "checksum": 0,
        "oem_id": OEM_ID,
        "revision": RSDP_REVISION,
        "rsdt_address": 0,
        "length": RSDP_LENGTH,
        "xsdt_address": xsdt_address,
        "extended_checksum": 0,
        "reserved": bytes(3),
    }
    rsdp = bytearray(Rsdp.build(fields))
    rsdp[8] = checksum(bytes(rsdp[:RSDP_V1_LENGTH]))
    rsdp[32] = checksum(bytes(rsdp))
    return bytes(rsdp)


def build_xsdt(table_addresses: Sequence[int]) -> bytes:
    """The XSDT: a header and one 64-bit address per table."""
    body = struct.pack(f"<{len(table_addresses)}Q", *table_addresses)
    return build_table(b"XSDT", XSDT_REVISION, body)


def build_fadt(dsdt_address: int) -> bytes:
    """A hardware-reduced FADT (revision 6.5) pointing at the DSDT (see module doc)."""
    if dsdt_address >= 1 << 32:
        raise ValueError("the DSDT must lie below 4 GiB (the FADT's DSDT field is 32-bit)")
    # Every field left out is zero: hardware-reduced ACPI has no fixed hardware blocks.
    body = FadtBody.build(
        sleep_control_reg=_io_byte_register(ACPI_SLEEP_CONTROL_PORT),
        sleep_status_reg=_io_byte_register(ACPI_SLEEP_STATUS_PORT),
        dsdt=dsdt_address,
        x_dsdt=dsdt_address,
        iapc_boot_arch=IAPC_BOOT_ARCH,
        flags=FADT_FLAGS,
        fadt_minor_version=FADT_MINOR_REVISION,
    )
    return build_table(b"FACP", FADT_REVISION, body)


def _io_byte_register(port: int) -> dict[str, int]:
    """A Generic Address Structure for one byte at a SystemIO port."""
    return {"space_id": GAS_SYSTEM_IO, "bit_width": 8, "bit_offset": 0,
            "access_size": GAS_ACCESS_BYTE, "address": port}


def build_madt(vcpus: int) -> bytes:
    """The MADT: ``vcpus`` enabled Local APICs, one I/O APIC and the IRQ0 -> GSI 2 override."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"vcpus must be 1..{MAX_VCPUS} (xAPIC IDs), got {vcpus}")
    body = MadtBody.build({"local_apic_address": LAPIC_ADDRESS, "flags": MADT_FLAGS})
    for cpu in range(vcpus):
        body += MadtLocalApic.build(
            {"processor_uid": cpu, "apic_id": cpu, "flags": LOCAL_APIC_ENABLED}
        )
    body += MadtIoApic.build(
        {"io_apic_id": IOAPIC_ID, "address": IOAPIC_ADDRESS, "gsi_base": IOAPIC_GSI_BASE}
    )
    body += MadtInterruptOverride.build(
        {"bus": ISA_BUS, "source": PIT_ISA_IRQ, "gsi": PIT_GSI, "flags": MPS_INTI_CONFORMS}
    )
    return build_table(b"APIC", MADT_REVISION, body)


def virtio_device_name(index: int) -> str:
    """The DSDT name of the ``index``-th virtio-mmio device: ``VR00``, ``VR01``, ..."""
    if not 0 <= index <= 0xFF:
        raise ValueError(f"at most 256 virtio-mmio devices, got index {index}")
    return f"VR{index:02X}"


def build_dsdt(virtio_devices: Sequence[tuple[int, int, int]]) -> bytes:
    """The DSDT: ``\\_SB.COM1`` and one ``\\_SB.VRnn`` per ``(base, size, gsi)``."""
    com1 = aml.device(
        "COM1",
        [
            aml.hid("PNP0501"),
            aml.uid(0),
            aml.crs(
                [
                    aml.io_port(COM1_PORT, COM1_PORT, 1, COM1_PORT_COUNT),
                    aml.interrupt(COM1_IRQ),
                ]
            ),
        ],
    )
    devices = [com1]
    for index, (base, size, gsi) in enumerate(virtio_devices):
        devices.append(
            aml.device(
                virtio_device_name(index),
                [
                    aml.hid(VIRTIO_MMIO_HID),
                    aml.uid(index),
                    aml.crs([aml.memory32_fixed(base, size), aml.interrupt(gsi)]),
                ],
            )
        )
    # \_S5_: Package {SLP_TYPa, SLP_TYPb}; hardware-reduced ACPI uses only the first.
    s5 = aml.name("\\_S5_", aml.package([aml.integer(S5_SLEEP_TYPE), aml.integer(0)]))
    return build_table(b"DSDT", DSDT_REVISION, s5 + aml.scope("\\_SB", devices))


# -- layout -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcpiTables:
    """The tables laid out from ``base_address``: write ``blob`` there in guest memory."""

    base_address: int
    blob: bytes
    rsdp_address: int
    #: Guest physical address of each table by signature: RSDP, XSDT, FACP, APIC, DSDT.
    table_addresses: dict[str, int] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.base_address + len(self.blob)


def _align(value: int) -> int:
    return (value + TABLE_ALIGNMENT - 1) & ~(TABLE_ALIGNMENT - 1)


def build_acpi_tables(
    *,
    vcpus: int,
    virtio_devices: Sequence[tuple[int, int, int]],
    base_address: int = ACPI_TABLES_ADDRESS,
) -> AcpiTables:
    """RSDP, XSDT, FADT, MADT and DSDT laid out from ``base_address`` in that order.

    ``virtio_devices`` lists ``(base, size, gsi)`` of each virtio-mmio window, in the
    order that gives their ``_UID`` 0, 1, ... Each table starts 16-byte aligned; the
    gaps are zero. :raises ValueError: a bad argument, an unaligned ``base_address`` or a
    layout crossing 4 GiB (the FADT's 32-bit DSDT pointer).
    """
    if base_address % TABLE_ALIGNMENT:
        raise ValueError(f"base_address must be {TABLE_ALIGNMENT}-byte aligned")
    dsdt = build_dsdt(virtio_devices)
    madt = build_madt(vcpus)

    rsdp_address = base_address
    xsdt_address = _align(rsdp_address + RSDP_LENGTH)
    xsdt_length = HEADER_LENGTH + 8 * 2
    fadt_address = _align(xsdt_address + xsdt_length)
    madt_address = _align(fadt_address + FADT_LENGTH)
    dsdt_address = _align(madt_address + len(madt))
    end = dsdt_address + len(dsdt)
    if end > 1 << 32:
        raise ValueError("the ACPI tables must lie below 4 GiB")
    if base_address == ACPI_TABLES_ADDRESS and end > ACPI_TABLES_END:
        raise ValueError(
            f"the ACPI tables ({end - base_address} bytes) overflow "
            f"[0x{ACPI_TABLES_ADDRESS:x}, 0x{ACPI_TABLES_END:x})"
        )

    placed = {
        "RSDP": (rsdp_address, build_rsdp(xsdt_address)),
        "XSDT": (xsdt_address, build_xsdt([fadt_address, madt_address])),
        "FACP": (fadt_address, build_fadt(dsdt_address)),
        "APIC": (madt_address, madt),
        "DSDT": (dsdt_address, dsdt),
    }
    blob = bytearray(end - base_address)
    for address, table in placed.values():
        offset = address - base_address
        blob[offset : offset + len(table)] = table
    return AcpiTables(
        base_address=base_address,
        blob=bytes(blob),
        rsdp_address=rsdp_address,
        table_addresses={sig: address for sig, (address, _) in placed.items()},
    )
