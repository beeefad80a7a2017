"""Dirty tracking on running VMs of the test guest: a pre-copy as a migration does it
(everything once, then round after round of what ``collect()`` reports, the last one
after the guest stopped) must end with a copy identical to guest RAM. A write that no
source reported leaves a page of the copy stale, and the test names it.

The guest's own writes reach the copy through KVM's log (``mem-walk`` writes tens of
MiB from ring 3); a device's writes (blk reads, net RX, console input, entropy, used
rings) only through avmm's own marks.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from avmm import VirtualMachine
from avmm.config import ConsoleConfig, DiskConfig, NetConfig, RngConfig, VmConfig
from avmm.memory import PAGE_SIZE
from avmm.migration.dirty import DirtyLog, PageSet
from tests.prerequisites import net_problem, require
from tests.state.mem_walk import expected_lines, mem_walk_lines
from tests.virtio_guest_support import echoing_tap as _echoing_tap
from tests.vm.helpers import guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

TIMEOUT_S = 180
#: Time between two rounds: short, so that rounds fall between a guest's write and a
#: device's write to the same page.
ROUND_S = 0.003


@pytest.fixture
def echoing_tap() -> Iterator[tuple[str, str]]:
    """(tap, network namespace) with a host-side echoer of the guest's test frames."""
    require(net_problem())
    with _echoing_tap() as (namespace, _echoer):
        yield namespace.tap, namespace.netns


class Precopy:
    """A copy of a VM's RAM kept up to date from a :class:`DirtyLog`, page numbers as
    memfd offsets / 4096 (the copy is indexed like the memfd)."""

    def __init__(self, vm: VirtualMachine) -> None:
        memory = vm.memory
        self.log = DirtyLog(vm._kvm_vm, memory, slots=enumerate(memory.regions))
        self.pages = memory.size // PAGE_SIZE
        self.copy = bytearray(memory.size)
        # RAM by memfd offset, as a migration stream reads it.
        self._ram = mmap.mmap(memory.fd, memory.size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ)
        self.rounds = 0
        self.pages_sent = 0

    def start(self) -> None:
        self.log.start()
        self._send(PageSet.full(self.pages))

    def round(self) -> int:
        pages = self.log.collect()
        self._send(pages)
        self.rounds += 1
        return len(pages)

    def _send(self, pages: PageSet) -> None:
        for first, count in pages.runs():
            start, end = first * PAGE_SIZE, (first + count) * PAGE_SIZE
            self.copy[start:end] = self._ram[start:end]
            self.pages_sent += count

    def stale_pages(self) -> list[int]:
        ram, copy = self._ram, self.copy
        return [page for page in range(self.pages)
                if ram[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
                != copy[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]]

    def close(self) -> None:
        self.log.stop()
        self._ram.close()


async def precopy_run(config: VmConfig, feed: bytes = b"") -> tuple[str, Precopy]:
    """Run ``config``'s guest to its end under a pre-copy; ``feed`` goes to its virtio
    console. Returns the serial output and the pre-copy after its last round (taken
    once the VM stopped, so nothing writes guest RAM any more)."""
    output = bytearray()
    async with VirtualMachine(config, start_paused=True) as vm:
        precopy = Precopy(vm)
        try:
            await trio.to_thread.run_sync(precopy.start)
            await vm.resume()

            async def rounds() -> None:
                while True:
                    await trio.sleep(ROUND_S)
                    await trio.to_thread.run_sync(precopy.round)

            with trio.fail_after(TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(rounds)
                    if feed:
                        assert vm.console is not None
                        await vm.console.send_all(feed)
                    async for chunk in vm.serial:
                        output += chunk
                    result = await vm.wait()
                    nursery.cancel_scope.cancel()
            assert not result.failed, (result, output.decode())
            await trio.to_thread.run_sync(precopy.round)
            assert precopy.rounds > 2, "too few rounds while the guest ran: nothing tested"
            stale = await trio.to_thread.run_sync(precopy.stale_pages)
            assert not stale, (f"{len(stale)} pages written but never reported dirty "
                               f"(memfd pages {stale[:16]})")
        finally:
            precopy.close()
    return output.decode(errors="replace"), precopy


async def test_guest_ring3_writes_reach_the_copy_through_kvm() -> None:
    mib, rounds = 16, 6
    config = guest_config(f"avmm.test=mem-walk avmm.mib={mib} avmm.rounds={rounds}",
                          memory_mib=24)
    output, precopy = await precopy_run(config)
    assert mem_walk_lines(output) == expected_lines(mib, rounds)
    # The walk rewrote its range every round: far more than one full copy was sent.
    assert precopy.pages_sent > precopy.pages + mib * 256


async def test_blk_reads_reach_the_copy(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(4 << 20))
    config = dataclasses.replace(guest_config("avmm.test=blk-crc", memory_mib=32),
                                 disks=(DiskConfig(image),))
    output, _ = await precopy_run(config)
    assert "blk0 sectors=" in output, output


async def test_entropy_reaches_the_copy() -> None:
    config = dataclasses.replace(guest_config("avmm.test=rng"), rng=RngConfig())
    output, _ = await precopy_run(config)
    assert "rng0 " in output, output


async def test_console_input_reaches_the_copy(tmp_path: Path) -> None:
    config = dataclasses.replace(guest_config("avmm.test=console"),
                                 console=ConsoleConfig(mode="file", path=tmp_path / "out"))
    lines = [os.urandom(40).hex() for _ in range(20)]
    output, _ = await precopy_run(config, ("\n".join(lines) + "\nquit\n").encode())
    assert f"console0 echoed={len(lines)}" in output, output


async def test_net_receive_reaches_the_copy(echoing_tap: tuple[str, str]) -> None:
    tap, netns = echoing_tap
    config = dataclasses.replace(
        guest_config("avmm.test=net-echo avmm.n=40 avmm.size=1400", memory_mib=32),
        nets=(NetConfig(tap=tap, mac=bytes.fromhex("525400abcdef"), netns=netns),))
    output, _ = await precopy_run(config)
    assert "net0 echoed=40" in output, output
