"""A stock Linux bzImage (Debian's cloud kernel) boots far enough to print its banner and
the exact command line avmm gave it.

On this workplace's KVM the decompressor and early kernel code run interpreted, so the
banner takes tens of seconds (about 45 s measured here); on hardware KVM it takes well
under a second. The bound below only guards against a hang.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest
import trio

from avmm import VirtualMachine

from .helpers import guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.debian_kernel]

BANNER_TIMEOUT_S = 400


async def test_debian_bzimage_prints_linux_version_and_our_command_line(
    debian_kernel: Path,
) -> None:
    marker = secrets.token_hex(4)
    cmdline = (f"console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 "
               f"avmm.marker={marker}")
    config = guest_config(cmdline, kernel=debian_kernel, memory_mib=256, cpu_profile="compat")
    output = bytearray()
    started = time.monotonic()
    async with VirtualMachine(config) as vm:
        with trio.move_on_after(BANNER_TIMEOUT_S):
            async for chunk in vm.serial:
                output += chunk
                if b"Linux version" in output and f"Command line: {cmdline}\n".encode() in (
                    output.replace(b"\r\n", b"\n")
                ):
                    break
        elapsed = time.monotonic() - started
        vm.stop()
    text = output.decode(errors="replace").replace("\r\n", "\n")
    assert "Linux version 6." in text, f"no banner after {elapsed:.0f} s: {text[-2000:]!r}"
    assert f"Command line: {cmdline}\n" in text
    print(f"Linux banner and command line after {elapsed:.1f} s")
