"""Helpers for tests that boot VMs: configs for the test guest, tiny ELF kernels."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

from avmm.config import BootConfig, MachineConfig, SerialConfig, VmConfig

REPO = Path(__file__).resolve().parents[2]
TEST_GUEST = REPO / "build" / "guest" / "testguest.elf"

#: The test guest's mailbox page (see tests/guest/README.md).
MAILBOX_ADDRESS = 0x200000
MAILBOX_MAGIC = 0x584F424C49414D41


def with_machine(config: VmConfig, **machine: object) -> VmConfig:
    """``config`` with these ``[machine]`` keys changed (e.g. ``cpu_weight=300``)."""
    return dataclasses.replace(config, machine=dataclasses.replace(config.machine, **machine))


def guest_config(cmdline: str, *, memory_mib: int = 32, vcpus: int = 1,
                 kernel: Path = TEST_GUEST, serial: SerialConfig | None = None,
                 cpu_profile: str = "host", name: str | None = None,
                 acpi: bool = False) -> VmConfig:
    """A VmConfig for ``kernel`` (the test guest by default) with serial output kept only
    in ``vm.serial``. ACPI is off by default: the test guest finds its virtio devices
    only through ``virtio_mmio.device=`` words, which avmm appends only without ACPI."""
    return VmConfig(
        machine=MachineConfig(vcpus=vcpus, memory_mib=memory_mib, cpu_profile=cpu_profile,
                              acpi=acpi),
        boot=BootConfig(kernel=kernel, initrd=None, cmdline=cmdline),
        serial=serial or SerialConfig(mode="none", path=None),
        source="test",
        name=name,
    )


def tiny_elf(path: Path, code: bytes, *, load_address: int = 0x100000) -> Path:
    """Write a minimal ELF64 executable whose single PT_LOAD puts ``code`` at
    ``load_address``, which is also the entry point."""
    header_size, phdr_size, code_offset = 64, 56, 0x1000
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2, 0x3E, 1,  # ET_EXEC, EM_X86_64, EV_CURRENT
        load_address, header_size, 0,  # entry, phoff, shoff
        0, header_size, phdr_size, 1, 0, 0, 0,
    )
    phdr = struct.pack(
        "<IIQQQQQQ",
        1, 5,  # PT_LOAD, R+X
        code_offset, load_address, load_address, len(code), len(code), 0x1000,
    )
    image = header + phdr
    image += bytes(code_offset - len(image)) + code
    path.write_bytes(image)
    return path


def host_profile_words() -> str:
    """What ``cpu_profile = "auto"`` puts in front of a configured command line on this
    host (with a trailing space), e.g. for checking what a guest echoes."""
    from avmm.cpu_profile import profile_cmdline, resolve_cpu_profile

    words = profile_cmdline(resolve_cpu_profile("auto"))
    return f"{words} " if words else ""
