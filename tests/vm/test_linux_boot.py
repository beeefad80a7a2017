"""A stock Linux bzImage (Debian's cloud kernel) boots far enough to print its banner and
the exact command line avmm gave it, parse avmm's ACPI tables, find both vCPUs in the
MADT and bring the second one up.

One Linux boot serves all the checks, because it is slow here: on this workplace's KVM
the decompressor and early kernel code run interpreted, so the banner takes 50-130 s
(measured here, alone or next to other tests), the ACPI and ``smpboot`` lines follow
about 1-7 s later and the second CPU is up 15-45 s after the banner; on hardware KVM all of
it takes well under a second. The bound below only guards against a hang.

``smpboot: Allowing 2 CPUs`` only says that the kernel read two LAPICs from the MADT;
``smp: Brought up 1 node, 2 CPUs`` is printed (kernel/smp.c, smp_init()) only once the
second CPU has been started (INIT/SIPI) and is online, so the test waits for that line.

The VM has 2 vCPUs, ACPI on (the default) and a virtio-rng device, so the command line
Linux echoes must be exactly the configured one: with ACPI the devices are in the DSDT,
never ``virtio_mmio.device=`` words.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from pathlib import Path

import pytest
import trio

from avmm import VirtualMachine
from avmm.config import RngConfig
from avmm.cpu_profile import profile_cmdline

from .helpers import guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.debian_kernel]

LINUX_TIMEOUT_S = 600
#: Printed (kernel/smp.c, smp_init()) only after the second CPU has come online.
BROUGHT_UP = "smp: Brought up 1 node, 2 CPUs"

#: Lines of Linux's early log that show it found and parsed avmm's tables (6.1 wording).
ACPI_LINES = (
    "ACPI: RSDP 0x00000000000E0000 000024 (v02 AVMM  )",
    "ACPI: XSDT 0x00000000000E0030",
    "ACPI: FACP 0x00000000000E0070",
    "ACPI: APIC 0x00000000000E0190",
    "ACPI: DSDT 0x00000000000E01F0",
    "ACPI: Using ACPI (MADT) for SMP configuration information",
    "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
)


async def test_debian_bzimage_banner_command_line_acpi_tables_and_two_cpus(
    debian_kernel: Path,
) -> None:
    marker = secrets.token_hex(4)
    cmdline = (f"console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 "
               f"avmm.marker={marker}")
    config = guest_config(cmdline, kernel=debian_kernel, memory_mib=256, vcpus=2,
                          cpu_profile="compat", acpi=True)
    config = dataclasses.replace(config, rng=RngConfig())
    output = bytearray()
    started = time.monotonic()
    banner_after = None
    async with VirtualMachine(config) as vm:
        with trio.move_on_after(LINUX_TIMEOUT_S):
            async for chunk in vm.serial:
                output += chunk
                if banner_after is None and b"Linux version" in output:
                    banner_after = time.monotonic() - started
                text = output.replace(b"\r\n", b"\n")
                if BROUGHT_UP.encode() in text and text.endswith(b"\n"):
                    break
        elapsed = time.monotonic() - started
        vm.stop()
    text = output.decode(errors="replace").replace("\r\n", "\n")
    assert "Linux version 6." in text, f"no banner after {elapsed:.0f} s: {text[-2000:]!r}"
    # The compat profile's words come first (test_cpu_profile.py checks them).
    assert f"Command line: {profile_cmdline('compat')} {cmdline}\n" in text
    assert "virtio_mmio.device=" not in text
    assert "BIOS-e820: [mem 0x00000000000e0000-0x00000000000fffff] reserved" in text
    missing = [line for line in ACPI_LINES if line not in text]
    assert not missing, f"missing {missing} after {elapsed:.0f} s: {text[-3000:]!r}"
    assert BROUGHT_UP in text, f"second CPU not up after {elapsed:.0f} s: {text[-3000:]!r}"
    print(f"Linux banner after {banner_after:.1f} s; ACPI tables, and the second CPU up "
          f"after {elapsed:.1f} s")
