"""ACPI tables: headers, checksums, pointers and MADT entries parsed back with the same
declarations and at the spec's byte offsets, then the whole set checked by acpica-tools
(iasl -d, a recompile of the DSDT, and acpiexec evaluating every device's
_HID/_UID/_CRS)."""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from avmm.arch.x86 import acpi
from avmm.arch.x86.acpi import (
    ACPI_TABLES_ADDRESS,
    ACPI_TABLES_END,
    FADT_HW_REDUCED_ACPI,
    FADT_LENGTH,
    FADT_MINOR_REVISION,
    HEADER_LENGTH,
    RSDP_LENGTH,
    RSDP_SCAN_END,
    RSDP_SCAN_START,
    AcpiTables,
    FadtBody,
    MadtBody,
    MadtInterruptOverride,
    MadtIoApic,
    MadtLocalApic,
    Rsdp,
    TableHeader,
    build_acpi_tables,
)
from avmm.arch.x86.layout import IOAPIC_ADDRESS, LAPIC_ADDRESS
from tests.prerequisites import require

#: What avmm's VM uses today (vm_virtio.py): 4 KiB windows from 0xd0000000, ISA IRQs.
VIRTIO = [(0xD000_0000 + i * 0x1000, 0x1000, irq) for i, irq in enumerate((5, 6, 7, 9))]
MAX_VIRTIO = [
    (0xD000_0000 + i * 0x1000, 0x1000, irq)
    for i, irq in enumerate((5, 6, 7, 9, 10, 11, 12, 14, 15))
]


def table_at(tables: AcpiTables, signature: str) -> bytes:
    offset = tables.table_addresses[signature] - tables.base_address
    if signature == "RSDP":
        return tables.blob[offset : offset + RSDP_LENGTH]
    (length,) = struct.unpack_from("<I", tables.blob, offset + 4)
    return tables.blob[offset : offset + length]


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    entries = []
    offset = HEADER_LENGTH + MadtBody.sizeof()
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        entries.append((kind, madt[offset : offset + length]))
        offset += length
    assert offset == len(madt)
    return entries


@pytest.fixture
def tables() -> AcpiTables:
    return build_acpi_tables(vcpus=2, virtio_devices=VIRTIO, base_address=ACPI_TABLES_ADDRESS)


def test_layout_in_the_bios_area(tables: AcpiTables) -> None:
    assert tables.rsdp_address == ACPI_TABLES_ADDRESS == RSDP_SCAN_START
    assert tables.rsdp_address % 16 == 0 and tables.rsdp_address < RSDP_SCAN_END
    assert list(tables.table_addresses) == ["RSDP", "XSDT", "FACP", "APIC", "DSDT"]
    addresses = list(tables.table_addresses.values())
    assert addresses == sorted(addresses)
    assert all(address % 16 == 0 for address in addresses)
    assert tables.end == tables.base_address + len(tables.blob)
    # The largest configuration still fits below the MP-table area.
    big = build_acpi_tables(vcpus=acpi.MAX_VCPUS, virtio_devices=MAX_VIRTIO)
    assert big.base_address == ACPI_TABLES_ADDRESS
    assert big.end <= ACPI_TABLES_END


def test_tables_do_not_overlap(tables: AcpiTables) -> None:
    spans = sorted(
        (address, address + len(table_at(tables, sig)))
        for sig, address in tables.table_addresses.items()
    )
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start
    assert spans[-1][1] == tables.end


def test_checksums_and_lengths(tables: AcpiTables) -> None:
    rsdp = table_at(tables, "RSDP")
    assert sum(rsdp[:20]) % 256 == 0
    assert sum(rsdp) % 256 == 0
    for signature in ("XSDT", "FACP", "APIC", "DSDT"):
        table = table_at(tables, signature)
        header = TableHeader.parse(table)
        assert header.signature == signature.encode()
        assert header.length == len(table)
        assert sum(table) % 256 == 0, signature
        assert header.oem_id == acpi.OEM_ID
    assert len(table_at(tables, "FACP")) == FADT_LENGTH


def test_pointers(tables: AcpiTables) -> None:
    rsdp = Rsdp.parse(table_at(tables, "RSDP"))
    assert rsdp.revision == 2 and rsdp.length == RSDP_LENGTH and rsdp.rsdt_address == 0
    assert rsdp.xsdt_address == tables.table_addresses["XSDT"]
    xsdt = table_at(tables, "XSDT")
    entries = struct.unpack(f"<{(len(xsdt) - HEADER_LENGTH) // 8}Q", xsdt[HEADER_LENGTH:])
    assert entries == (tables.table_addresses["FACP"], tables.table_addresses["APIC"])
    fadt = FadtBody.parse(table_at(tables, "FACP")[HEADER_LENGTH:])
    assert fadt.dsdt == fadt.x_dsdt == tables.table_addresses["DSDT"]


def test_fadt_is_hardware_reduced(tables: AcpiTables) -> None:
    table = table_at(tables, "FACP")
    assert TableHeader.parse(table).revision == 6
    fadt = FadtBody.parse(table[HEADER_LENGTH:])
    assert fadt.flags & FADT_HW_REDUCED_ACPI
    assert fadt.fadt_minor_version == 5
    for legacy in ("smi_cmd", "pm1a_evt_blk", "pm1a_cnt_blk", "pm_tmr_blk", "gpe0_blk",
                   "sci_int", "firmware_ctrl", "x_firmware_ctrl"):
        assert fadt[legacy] == 0, legacy
    for gas in ("reset_reg", "x_pm1a_evt_blk", "x_pm_tmr_blk"):
        assert fadt[gas].address == 0, gas
    assert fadt.iapc_boot_arch == acpi.IAPC_BOOT_ARCH


def test_fadt_sleep_registers_and_s5_make_acpi_power_off_possible(tables: AcpiTables) -> None:
    """Linux installs ACPI power-off on hardware-reduced ACPI only with both sleep
    registers and a \\_S5_ object; both registers are single SystemIO bytes."""
    fadt = FadtBody.parse(table_at(tables, "FACP")[HEADER_LENGTH:])
    control, status = fadt.sleep_control_reg, fadt.sleep_status_reg
    assert (control.space_id, control.bit_width, control.access_size) == (1, 8, 1)
    assert (status.space_id, status.bit_width, status.access_size) == (1, 8, 1)
    assert control.address == acpi.ACPI_SLEEP_CONTROL_PORT
    assert status.address == acpi.ACPI_SLEEP_CONTROL_PORT + 1
    dsdt = table_at(tables, "DSDT")
    # Name (\_S5_, Package (2) {5, 0}): NameOp, root prefix, name, PackageOp.
    assert b"\x08\\_S5_\x12" in dsdt


@pytest.mark.parametrize("vcpus", [1, 2, 8, acpi.MAX_VCPUS])
def test_madt_entries(vcpus: int) -> None:
    tables = build_acpi_tables(vcpus=vcpus, virtio_devices=VIRTIO, base_address=0x10_0000)
    madt = table_at(tables, "APIC")
    body = MadtBody.parse(madt[HEADER_LENGTH:])
    assert body.local_apic_address == LAPIC_ADDRESS
    assert body.flags == 0
    entries = madt_entries(madt)
    lapics = [MadtLocalApic.parse(data) for kind, data in entries if kind == 0]
    assert [(e.processor_uid, e.apic_id, e.flags) for e in lapics] == [
        (cpu, cpu, 1) for cpu in range(vcpus)
    ]
    ioapics = [MadtIoApic.parse(data) for kind, data in entries if kind == 1]
    assert [(e.io_apic_id, e.address, e.gsi_base) for e in ioapics] == [(0, IOAPIC_ADDRESS, 0)]
    overrides = [MadtInterruptOverride.parse(data) for kind, data in entries if kind == 2]
    assert [(e.bus, e.source, e.gsi, e.flags) for e in overrides] == [(0, 0, 2, 0)]
    assert len(entries) == vcpus + 2


def test_dsdt_names_every_device(tables: AcpiTables) -> None:
    dsdt = table_at(tables, "DSDT")
    assert dsdt.count(b"\x0dLNRO0005\x00") == len(VIRTIO)
    assert b"COM1" in dsdt and b"\x0c\x41\xd0\x05\x01" in dsdt
    for index, (base, size, gsi) in enumerate(VIRTIO):
        assert acpi.virtio_device_name(index).encode() in dsdt
        assert struct.pack("<BII", 1, base, size) in dsdt
        assert b"\x89\x06\x00\x03\x01" + struct.pack("<I", gsi) in dsdt


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vcpus": 0, "virtio_devices": []},
        {"vcpus": 255, "virtio_devices": []},
        {"vcpus": 1, "virtio_devices": [], "base_address": 0xE0008},
        {"vcpus": 1, "virtio_devices": [], "base_address": 0xFFFF_FF00},
        {"vcpus": 1, "virtio_devices": [(0xFFFF_F000, 0x2000, 5)]},
        {"vcpus": 1, "virtio_devices": [(0xD000_0000, 0x1000, 5)] * 257,
         "base_address": 0x100_0000},
    ],
)
def test_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_acpi_tables(**kwargs)


def test_no_virtio_devices() -> None:
    tables = build_acpi_tables(vcpus=1, virtio_devices=[], base_address=ACPI_TABLES_ADDRESS)
    assert b"LNRO" not in table_at(tables, "DSDT")
    assert b"COM1" in table_at(tables, "DSDT")


# -- acpica-tools ------------------------------------------------------------------------


def run(tool: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def write_tables(tables: AcpiTables, directory: Path) -> dict[str, Path]:
    paths = {}
    for signature in ("XSDT", "FACP", "APIC", "DSDT"):
        path = directory / f"{signature.lower()}.dat"
        path.write_bytes(table_at(tables, signature))
        paths[signature] = path
    return paths


def disassemble(path: Path) -> str:
    output = run("iasl", "-d", path.name, cwd=path.parent)
    assert "Error" not in output and "Warning" not in output, output
    dsl = path.with_suffix(".dsl").read_text()
    assert "Incorrect checksum" not in dsl
    assert "Invalid" not in dsl
    return dsl


def test_iasl_disassembles_the_tables(tables: AcpiTables, tmp_path: Path) -> None:
    require(None if shutil.which("iasl") else "iasl is not installed (acpica-tools)")
    paths = write_tables(tables, tmp_path)
    xsdt = disassemble(paths["XSDT"])
    assert f"ACPI Table Address   0 : {tables.table_addresses['FACP']:016X}" in xsdt
    assert f"ACPI Table Address   1 : {tables.table_addresses['APIC']:016X}" in xsdt

    fadt = disassemble(paths["FACP"])
    assert "Hardware Reduced (V5) : 1" in fadt
    assert f"DSDT Address : {tables.table_addresses['DSDT']:016X}" in fadt
    assert "Sleep Control Register : [Generic Address Structure]" in fadt
    assert "Address : 0000000000000600" in fadt and "Address : 0000000000000601" in fadt

    madt = disassemble(paths["APIC"])
    assert madt.count("[Processor Local APIC]") == 2
    assert "Processor Enabled : 1" in madt
    assert "Address : FEC00000" in madt
    assert "[Interrupt Source Override]" in madt
    assert "Local Apic Address : FEE00000" in madt

    dsdt = disassemble(paths["DSDT"])
    assert "Scope (\\_SB)" in dsdt
    assert "Name (\\_S5, Package (0x02)" in dsdt
    assert "Device (COM1)" in dsdt
    assert 'Name (_HID, EisaId ("PNP0501")' in dsdt
    assert "0x03F8,             // Range Minimum" in dsdt
    assert dsdt.count('Name (_HID, "LNRO0005")') == len(VIRTIO)
    assert dsdt.count("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )") == (
        len(VIRTIO) + 1
    )
    assert "0x00000004," in dsdt
    for index, (base, size, gsi) in enumerate(VIRTIO):
        assert f"Device ({acpi.virtio_device_name(index)})" in dsdt
        assert f"0x{base:08X},         // Address Base" in dsdt
        assert f"0x{size:08X},         // Address Length" in dsdt
        assert f"0x{gsi:08X}," in dsdt

    # The DSDT recompiles (no errors, no warnings) to the same AML.
    output = run("iasl", "-oa", "-p", "again", "dsdt.dsl", cwd=tmp_path)
    assert "0 Errors, 0 Warnings" in output, output
    again = (tmp_path / "again.aml").read_bytes()
    assert again[HEADER_LENGTH:] == table_at(tables, "DSDT")[HEADER_LENGTH:]


def test_acpiexec_evaluates_the_devices(tables: AcpiTables, tmp_path: Path) -> None:
    require(None if shutil.which("acpiexec") else "acpiexec is not installed (acpica-tools)")
    paths = write_tables(tables, tmp_path)
    commands = ["Evaluate \\_SB.COM1._HID", "Evaluate \\_SB.COM1._CRS"]
    for index in range(len(VIRTIO)):
        name = acpi.virtio_device_name(index)
        commands += [f"Evaluate \\_SB.{name}._HID", f"Evaluate \\_SB.{name}._UID",
                     f"Evaluate \\_SB.{name}._CRS"]
    output = run(
        "acpiexec", "-b", "; ".join(commands),
        str(paths["FACP"]), str(paths["APIC"]), str(paths["DSDT"]), cwd=tmp_path,
    )
    assert "Warning" not in output and "Error" not in output, output
    assert f"{1 + len(VIRTIO)} Devices" in output, output
    assert "[Integer] = 000000000105D041" in output  # EISAID("PNP0501")
    assert output.count('[String] Length 08 = "LNRO0005"') == len(VIRTIO), output
    for index in range(len(VIRTIO)):
        assert f"[Integer] = {index:016X}" in output


def test_fields_lie_at_the_specs_offsets(tables: AcpiTables) -> None:
    """Read back at ACPI 6.5's byte offsets (§5.2.5.3, §5.2.6, §5.2.9), independently
    of avmm's declarations."""
    assert FadtBody.size == FADT_LENGTH - HEADER_LENGTH
    rsdp = table_at(tables, "RSDP")
    assert rsdp[0:8] == b"RSD PTR " and rsdp[9:15] == acpi.OEM_ID and rsdp[15] == 2
    assert struct.unpack_from("<IIQ", rsdp, 16) == (0, RSDP_LENGTH, tables.table_addresses["XSDT"])
    assert rsdp[33:36] == bytes(3)
    fadt = table_at(tables, "FACP")
    assert fadt[0:4] == b"FACP" and struct.unpack_from("<I", fadt, 4)[0] == FADT_LENGTH
    assert fadt[10:16] == acpi.OEM_ID and fadt[16:24] == acpi.OEM_TABLE_ID
    assert fadt[28:32] == acpi.CREATOR_ID
    dsdt = tables.table_addresses["DSDT"]
    assert struct.unpack_from("<I", fadt, 40)[0] == dsdt
    assert struct.unpack_from("<H", fadt, 109)[0] == acpi.IAPC_BOOT_ARCH
    assert struct.unpack_from("<I", fadt, 112)[0] == acpi.FADT_FLAGS
    assert fadt[131] == FADT_MINOR_REVISION
    assert struct.unpack_from("<Q", fadt, 140)[0] == dsdt
    # SLEEP_CONTROL_REG at 244 and SLEEP_STATUS_REG at 256: SystemIO, 8 bits, byte access.
    for offset, port in ((244, acpi.ACPI_SLEEP_CONTROL_PORT), (256, acpi.ACPI_SLEEP_STATUS_PORT)):
        assert struct.unpack_from("<BBBBQ", fadt, offset) == (1, 8, 0, 1, port)
    assert fadt[268:276] == bytes(8)
    madt = table_at(tables, "APIC")
    assert struct.unpack_from("<II", madt, 36) == (LAPIC_ADDRESS, 0)
    # The first Local APIC: type 0, length 8, UID 0, APIC ID 0, enabled.
    assert struct.unpack_from("<BBBBI", madt, 44) == (0, 8, 0, 0, 1)
