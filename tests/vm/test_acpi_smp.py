"""ACPI tables and SMP wiring, checked with the test guest (fast; no Linux boot).

* ``machine.acpi = true``: the tables are in guest memory at 0xe0000, the zero page
  points at the RSDP, and the virtio devices are *not* on the command line;
* ``machine.acpi = false``: no tables, and one ``virtio_mmio.device=`` word per device;
* ``vcpus = 2``: the second vCPU waits in KVM_RUN for a SIPI that the test guest never
  sends, without a single exit to userspace, and stopping the VM still ends it.

The Linux side (the kernel parsing the tables and finding the CPUs) is in
``test_linux_boot.py``, which shares one slow Linux boot.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import trio

from avmm import StopReason, VirtualMachine
from avmm.arch.x86.acpi import ACPI_TABLES_ADDRESS, RSDP_SIGNATURE, Rsdp, TableHeader
from avmm.arch.x86.boot_params import parse_zero_page
from avmm.arch.x86.layout import ZERO_PAGE_ADDRESS
from avmm.config import RngConfig, VmConfig
from avmm.vm import acpi_tables, kernel_cmdline
from avmm.vm_virtio import placements

from .helpers import guest_config

VIRTIO_WORD = "virtio_mmio.device="


def _with_rng(config: VmConfig) -> VmConfig:
    return dataclasses.replace(config, rng=RngConfig())


def _fake_slots(count: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(placement=placement) for placement in placements(count)]


def test_cmdline_has_virtio_words_only_without_acpi() -> None:
    slots = _fake_slots(2)
    with_acpi = guest_config("console=ttyS0", acpi=True)
    without = guest_config("console=ttyS0", acpi=False)
    assert kernel_cmdline(with_acpi, slots) == "console=ttyS0"  # type: ignore[arg-type]
    assert kernel_cmdline(without, slots) == (  # type: ignore[arg-type]
        "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
    )


def test_acpi_tables_describe_every_slot_and_vcpu() -> None:
    tables = acpi_tables(guest_config("", vcpus=3, acpi=True), _fake_slots(2))  # type: ignore[arg-type]
    dsdt = tables.blob[tables.table_addresses["DSDT"] - tables.base_address:]
    assert dsdt.count(b"LNRO0005") == 2
    madt_offset = tables.table_addresses["APIC"] - tables.base_address
    madt = TableHeader.parse(tables.blob[madt_offset:])
    body = tables.blob[madt_offset + 36 + 8:madt_offset + madt.length]
    # Type 0 (Local APIC), length 8 entries come first, one per vCPU.
    assert [body[i] for i in range(0, 3 * 8, 8)] == [0, 0, 0]
    assert body[3 * 8] != 0


@pytest.mark.kvm
@pytest.mark.guest
async def test_acpi_on_tables_in_memory_and_no_cmdline_devices() -> None:
    config = _with_rng(guest_config("avmm.test=hello", acpi=True))
    output = bytearray()
    async with VirtualMachine(config) as vm:
        with trio.fail_after(60):
            async for chunk in vm.serial:
                output += chunk
            result = await vm.wait()
        assert vm.memory is not None
        rsdp = Rsdp.parse(vm.memory.read(ACPI_TABLES_ADDRESS, 36))
        assert vm.memory.read(ACPI_TABLES_ADDRESS, 8) == RSDP_SIGNATURE == b"RSD PTR "
        assert vm.memory.read(rsdp.xsdt_address, 4) == b"XSDT"
        xsdt = vm.memory.read(rsdp.xsdt_address, 36 + 16)
        fadt, madt = (int.from_bytes(xsdt[i:i + 8], "little") for i in (36, 44))
        assert vm.memory.read(fadt, 4) == b"FACP" and vm.memory.read(madt, 4) == b"APIC"
        zero_page = parse_zero_page(vm.memory.read(ZERO_PAGE_ADDRESS, 4096))
        assert zero_page.acpi_rsdp_addr == ACPI_TABLES_ADDRESS
        reserved = [(e.addr, e.addr + e.size) for e in zero_page.e820_table[:zero_page.e820_entries]
                    if e.type == 2]
        assert (0xE0000, 0x100000) in reserved
    text = output.decode(errors="replace")
    assert "avmm-testguest: cmdline: avmm.test=hello\n" in text, text
    assert VIRTIO_WORD not in text
    assert result.reason is StopReason.RESET, text


@pytest.mark.kvm
@pytest.mark.guest
async def test_acpi_off_no_tables_and_cmdline_devices() -> None:
    config = _with_rng(guest_config("avmm.test=hello", acpi=False))
    output = bytearray()
    async with VirtualMachine(config) as vm:
        with trio.fail_after(60):
            async for chunk in vm.serial:
                output += chunk
            result = await vm.wait()
        assert vm.memory is not None
        assert vm.memory.read(ACPI_TABLES_ADDRESS, 8) == bytes(8)
        zero_page = parse_zero_page(vm.memory.read(ZERO_PAGE_ADDRESS, 4096))
        assert zero_page.acpi_rsdp_addr == 0
    text = output.decode(errors="replace")
    assert "avmm-testguest: cmdline: avmm.test=hello virtio_mmio.device=4K@0xd0000000:5\n" \
        in text, text
    assert result.reason is StopReason.RESET, text


@pytest.mark.kvm
@pytest.mark.guest
async def test_application_processor_waits_for_sipi_without_exits() -> None:
    async with VirtualMachine(guest_config("avmm.test=echo", vcpus=2, acpi=True)) as vm:
        output = bytearray()
        with trio.fail_after(30):
            while b"echo ready\n" not in output:
                output += await vm.serial.receive_some()
        await trio.sleep(1.0)
        # The AP has been in KVM_RUN all along, asleep in the kernel until a SIPI: no
        # exits to userspace (a spinning AP would show thousands).
        assert len(vm._loops) == 2
        assert vm._loops[1].exit_counts == {}
        assert vm._loops[0].exit_counts
        with trio.fail_after(10):
            vm.stop()
            result = await vm.wait()
    assert result.reason is StopReason.STOPPED
