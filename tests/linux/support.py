"""What the Linux tests (``make test-linux``) share: the kernels and their time limit,
the guest's disks, NIC and config, and the ``snapshot-checks`` hand-shake (the guest
says it waits for the host, the host types a line, the guest runs guest-checks) that the
snapshot and the migration tests drive on both sides."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path
from typing import BinaryIO

import trio

from avmm import VirtualMachine
from avmm.config import DiskConfig, NetConfig, RngConfig, VmConfig
from tests.prerequisites import BUILD
from tests.virtio_guest_support import TapNamespace
from tests.vm.helpers import guest_config

TIMEOUT_S = float(os.environ.get("AVMM_LINUX_TIMEOUT_S", "1800"))
MINIMAL_KERNEL = BUILD / "linux" / "bzImage"
MINIMAL_VMLINUX = BUILD / "linux" / "vmlinux"  # the same build's symbols
MINIMAL_INITRAMFS = BUILD / "linux" / "initramfs.cpio"
DEBIAN_INITRAMFS = BUILD / "debian-kernel" / "initramfs.cpio"
HOST_ADDRESS = "10.0.2.1"
GUEST_ADDRESS = "10.0.2.15"
MAC = bytes.fromhex("525400123456")
READY = "avmm-linux: ready"
#: snapshot-checks' line before it reads one from the console, the line the host types
#: and the guest's echo of it.
WAITING = "avmm-linux: waiting for the host"
GO = "restored"
HOST_SAID = f"avmm-linux: host said {GO}"
KERNEL_BANNER = "Linux version "


#: A kernel console message, from its timestamp to its end of line. The kernel writes
#: to the console directly, while a process's writes drain through the tty: a message
#: (a fault a test provokes, say) can land in the middle of a line /init's script is
#: printing.
_KERNEL_MESSAGE = re.compile(r"\[ *\d+\.\d+\] [^\r\n]*\r?\n")


def linux_lines(text: str) -> list[str]:
    """The lines /init's scripts print (``avmm-linux: ...``), in order, each whole again
    where a kernel message cut it in two."""
    text = _KERNEL_MESSAGE.sub("", text)
    return [m.group(0).strip() for m in re.finditer(r"avmm-linux: [^\r\n]*", text)]


@dataclasses.dataclass(frozen=True)
class GuestDisks:
    """A raw data disk of random bytes (read whole by the guest) and an empty ext4
    image (the guest writes a file there, read back with debugfs)."""

    data_image: Path
    ext4_image: Path

    @classmethod
    def make(cls, directory: Path) -> tuple[GuestDisks, bytes]:
        """New images in ``directory``; also returns the data disk's contents."""
        data = os.urandom(4 << 20)
        data_image = directory / "data.img"
        data_image.write_bytes(data)
        ext4_image = directory / "ext4.img"
        with open(ext4_image, "wb") as f:
            f.truncate(16 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(ext4_image)], check=True,
                       capture_output=True, timeout=60)
        return cls(data_image, ext4_image), data


def linux_config(kernel: Path, initramfs: Path, disks: GuestDisks, *, run: str, seed: int,
                 netns: str, tap: str, extra: str = "") -> VmConfig:
    """The machine every Linux test boots: 2 vCPUs, 256 MiB, ACPI, the data and ext4
    disks, a NIC on ``tap`` in ``netns``, virtio-rng; /init runs ``run``."""
    cmdline = (f"console=ttyS0 panic=-1 avmm.run={run} avmm.seed={seed} "
               f"avmm.ip={GUEST_ADDRESS}/24 avmm.peer={HOST_ADDRESS} {extra}").rstrip()
    config = guest_config(cmdline, kernel=kernel, memory_mib=256, vcpus=2, acpi=True,
                          cpu_profile="auto")
    return dataclasses.replace(
        config,
        boot=dataclasses.replace(config.boot, initrd=initramfs),
        disks=(DiskConfig(path=disks.data_image, readonly=True, id="avmm-data"),
               DiskConfig(path=disks.ext4_image, id="avmm-ext4")),
        nets=(NetConfig(tap=tap, netns=netns, mac=MAC),),
        rng=RngConfig(),
    )


def host_end(namespace: TapNamespace) -> None:
    """Give the host end of the guest's tap the address the guest pings."""
    subprocess.run(["ip", "-n", namespace.netns, "addr", "add", f"{HOST_ADDRESS}/24",
                    "dev", namespace.tap], check=True, capture_output=True, timeout=30)


def keep(chunk: bytes, output: bytearray, log: BinaryIO) -> None:
    """A chunk of serial output, kept in ``output`` and in the log file (flushed: a slow
    boot can be watched with ``tail -f``)."""
    output.extend(chunk)
    log.write(chunk)
    log.flush()


async def boot_until_waiting(vm: VirtualMachine, output: bytearray, log: BinaryIO,
                             ) -> tuple[bool, bool | None]:
    """Collect the serial output (into ``output`` and ``log``) until snapshot-checks
    says it waits for the host, within :data:`TIMEOUT_S`. Returns whether it did, and
    whether avmm had seen the boot-time marker when /init's ready line arrived (None if
    it never did)."""
    marker_at_ready: list[bool] = []
    with trio.move_on_after(TIMEOUT_S):
        async for chunk in vm.serial:
            keep(chunk, output, log)
            if not marker_at_ready and READY.encode() in output:
                marker_at_ready.append(vm.userspace_reached_s is not None)
            if WAITING.encode() in output:
                break
    reached = WAITING.encode() in output
    return reached, marker_at_ready[0] if marker_at_ready else None


async def answer_and_collect(vm: VirtualMachine, output: bytearray, log: BinaryIO) -> None:
    """Type the line snapshot-checks waits for (unless the VM has already ended) and
    collect the serial output until the VM ends."""
    async with trio.open_nursery() as nursery:
        async def collect() -> None:
            async for chunk in vm.serial:
                keep(chunk, output, log)

        nursery.start_soon(collect)
        if vm.exit is None:
            await vm.serial.send_all(f"{GO}\n".encode())
        await vm.wait()
        nursery.cancel_scope.cancel()
