"""README features that had no test: each test boots a VM and checks the claim from the
guest's side or from the VM's own bookkeeping, not from timing."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from avmm import StopReason, VirtualMachine, VmExit
from avmm.config import ConsoleConfig, NetConfig
from avmm.kvm import exits
from avmm.lifecycle import GUEST_FAILURE_STATUS, HOST_FAILURE_STATUS, StopLatch, VmState
from avmm.vcpu_loop import VcpuLoop
from tests.prerequisites import net_problem, require
from tests.virtio_guest_support import TapNamespace

from .guest_report import guest_report
from .helpers import MAILBOX_ADDRESS, guest_config, tiny_elf

kvm = [pytest.mark.kvm, pytest.mark.guest]

COUNTER = MAILBOX_ADDRESS + 8
#: The kvmclock scenario's stop request (mailbox scratch word 0).
KVMCLOCK_STOP = MAILBOX_ADDRESS + 64

# mov al, 123 ; mov dx, 0x440 ; out dx, al ; jmp $      (the boot-time marker, then spin)
MARKER_THEN_SPIN = bytes.fromhex("b07b 66ba4004 ee ebfe")
# mov eax, 0xd8000000 ; jmp rax   (ring 0 jumps into MMIO space: no RAM to fetch from)
JUMP_INTO_MMIO = bytes.fromhex("b8000000d8 ffe0")
SPIN = bytes.fromhex("ebfe")


async def read_all(stream: Any) -> str:
    return b"".join([chunk async for chunk in stream]).decode()


async def wait_for_counter(vm: VirtualMachine, at_least: int) -> None:
    assert vm.memory is not None
    with trio.fail_after(60):
        while vm.memory.read_u64(COUNTER) < at_least:
            assert vm.state is VmState.RUNNING
            await trio.sleep(0.01)


# -- vm.wait_userspace() ------------------------------------------------------------------


@pytest.mark.kvm
async def test_wait_userspace_returns_at_the_marker_while_the_guest_runs_on(
        tmp_path: Path) -> None:
    kernel = tiny_elf(tmp_path / "marker.elf", MARKER_THEN_SPIN)
    before = time.monotonic()
    async with VirtualMachine(guest_config("", kernel=kernel)) as vm:
        with trio.fail_after(60):
            seconds = await vm.wait_userspace()
        inside = time.monotonic() - before
        # It returned because of the marker, not because the VM ended: the guest spins on.
        assert vm.state is VmState.RUNNING
        assert seconds == vm.userspace_reached_s
        assert 0 < seconds <= inside
        # A second call returns the same figure at once.
        assert await vm.wait_userspace() == seconds
        vm.stop()
        result = await vm.wait()
    assert result.reason is StopReason.STOPPED


@pytest.mark.kvm
@pytest.mark.guest
async def test_wait_userspace_never_returns_for_a_guest_without_the_marker() -> None:
    returned: list[float] = []
    vm = VirtualMachine(guest_config("avmm.test=hello"))

    async def waiter() -> None:
        returned.append(await vm.wait_userspace())

    async with vm, trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        result = await vm.wait()
        # Everything has settled (the VM is gone) and the waiter is still blocked.
        await trio.testing.wait_all_tasks_blocked()
        assert returned == []
        nursery.cancel_scope.cancel()
    assert result.reason is StopReason.RESET
    assert vm.userspace_reached_s is None


# -- kvmclock across a pause --------------------------------------------------------------

PAUSE_S = 2.0


@pytest.mark.kvm
@pytest.mark.guest
async def test_the_guests_kvmclock_does_not_jump_across_a_pause() -> None:
    """The guest reads kvmclock in a loop. The VM is paused for 2 s between two of its
    reads: the guest sees that gap on its TSC (which keeps running), while its kvmclock
    moves on by far less than the pause, because avmm saves the clock with
    KVM_GET_CLOCK at pause and restores it with KVM_SET_CLOCK at resume. Without the
    restore the step is the whole pause (checked by hand: about 2.0 s)."""
    async with VirtualMachine(guest_config("avmm.test=kvmclock")) as vm:
        assert vm.memory is not None
        await wait_for_counter(vm, 1000)
        await vm.pause()
        await trio.sleep(PAUSE_S)
        await vm.resume()
        await wait_for_counter(vm, vm.memory.read_u64(COUNTER) + 1000)
        vm.memory.write(KVMCLOCK_STOP, (1).to_bytes(8, "little"))
        with trio.fail_after(60):
            result = await vm.wait()
        output = await read_all(vm.serial)
    assert result.reason is StopReason.RESET, output
    report = guest_report(output, "kvmclock")
    # The pause really fell between two guest reads: its TSC saw (at least) the pause.
    assert int(report["tsc_gap_ns"]) >= PAUSE_S * 1e9 * 0.95, report
    # ... and over that same gap kvmclock moved on by less than half of it.
    assert int(report["step_at_gap_ns"]) < PAUSE_S * 1e9 / 2, report


# -- virtio-console ----------------------------------------------------------------------


def console_lines(inputs: list[str]) -> str:
    """What the test guest's console scenario says for ``inputs`` (its contract, in
    tests/guest/scenarios/console.c)."""
    lines = ["hello", *(f"echo {line}" for line in inputs), "bye"]
    return "".join(f"avmm-testguest: console {line}\n" for line in lines)


@pytest.mark.kvm
@pytest.mark.guest
async def test_virtio_console_in_file_mode_writes_the_file_and_takes_input(
        tmp_path: Path) -> None:
    out = tmp_path / "console.out"
    out.write_text("old content that must go\n")
    config = dataclasses.replace(guest_config("avmm.test=console"),
                                 console=ConsoleConfig(mode="file", path=out))
    inputs = ["first line", "second, after a CRLF"]
    async with VirtualMachine(config) as vm:
        assert vm.console is not None
        await vm.console.send_all(f"{inputs[0]}\r\n{inputs[1]}\nquit\n".encode())
        with trio.fail_after(60):
            result = await vm.wait()
        serial = await read_all(vm.serial)
        streamed = await read_all(vm.console)
    assert result.reason is StopReason.RESET, serial
    assert guest_report(serial, "console0")["echoed"] == str(len(inputs))
    assert out.read_text() == streamed == console_lines(inputs)


# -- how a VM that cannot go on ends ------------------------------------------------------


@pytest.mark.kvm
async def test_an_emulation_failure_is_a_guest_crash_with_status_4(tmp_path: Path) -> None:
    """Ring 0 jumps into MMIO space: KVM has no RAM to fetch the instruction from and
    reports an emulation failure (KVM_EXIT_INTERNAL_ERROR, suberror 1), here and on
    hardware KVM alike."""
    kernel = tiny_elf(tmp_path / "jump.elf", JUMP_INTO_MMIO)
    async with VirtualMachine(guest_config("", kernel=kernel)) as vm:
        with trio.fail_after(60):
            result = await vm.wait()
    assert result.reason is StopReason.INTERNAL_ERROR
    assert result.exit_status == GUEST_FAILURE_STATUS == 4
    assert result.failed
    assert "emulation failure" in result.detail
    assert "rip=0xd8000000" in result.detail


def _vcpu0(vm: VirtualMachine) -> Any:
    # No public handle on a vCPU: this test corrupts its state on purpose.
    return vm._vcpus[0]


@pytest.mark.kvm
async def test_a_vcpu_state_the_cpu_cannot_enter_ends_as_a_guest_crash(tmp_path: Path) -> None:
    """A non-canonical RIP in 64-bit mode, set from the host before the first entry.
    VMX refuses the entry itself (KVM_EXIT_FAIL_ENTRY); SVM and this workplace's
    kvm_pvm enter and fault (the guest has no IDT: a triple fault). Either way the
    guest crashed: status 4, never a host failure."""
    kernel = tiny_elf(tmp_path / "spin.elf", SPIN)
    async with VirtualMachine(guest_config("", kernel=kernel), start_paused=True) as vm:
        vcpu = _vcpu0(vm)
        regs = vcpu.get_regs()
        regs.rip = 0x8000_0000_0000_0000
        vcpu.set_regs(regs)
        await vm.resume()
        with trio.fail_after(60):
            result = await vm.wait()
    assert result.reason in (StopReason.FAIL_ENTRY, StopReason.TRIPLE_FAULT), result
    assert result.exit_status == GUEST_FAILURE_STATUS
    assert "rip=0x8000000000000000" in result.detail


class _FailingEntryVcpu:
    """Just enough of :class:`avmm.kvm.Vcpu` for a VcpuLoop: KVM_RUN answers a failed
    entry (what VMX reports for invalid guest state: exit reason 33 with bit 31)."""

    id = 0
    thread_ident: int | None = None
    absorb_epoch = 0

    def run(self) -> exits.VcpuExit:
        return exits.FailEntry(reason=0x8000_0021, cpu=3)

    def get_regs(self) -> Any:
        return type("Regs", (), {"rip": 0x100000})()

    def take_absorbed(self) -> dict[type, int]:
        return {}

    def absorb(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("nothing to absorb")

    def set_immediate_exit(self, value: bool) -> None:
        pass


class _NoBus:
    def read(self, address: int, size: int) -> bytes:
        raise AssertionError("no bus access expected")

    def write(self, address: int, data: bytes) -> bool:
        raise AssertionError("no bus access expected")


def test_a_failed_vm_entry_stops_the_vm_as_a_guest_crash_with_status_4() -> None:
    """KVM_EXIT_FAIL_ENTRY cannot be provoked on kvm_pvm (see the test above), so the
    vCPU loop's handling of it is checked with a vCPU that reports one."""
    stopped: list[VmExit] = []
    latch = StopLatch(stopped.append)
    loop = VcpuLoop(_FailingEntryVcpu(), pio_bus=_NoBus(), mmio_bus=_NoBus(),  # type: ignore[arg-type]
                    read_guest=lambda address, length: None, latch=latch)
    loop.run()  # returns once the latch is set: after the first exit here
    assert len(stopped) == 1
    result = stopped[0]
    assert result.reason is StopReason.FAIL_ENTRY
    assert result.exit_status == GUEST_FAILURE_STATUS
    assert result.failed
    assert "KVM_EXIT_FAIL_ENTRY" in result.detail and "0x80000021" in result.detail
    assert "rip=0x100000" in result.detail
    assert loop.exit_counts == {"FailEntry": 1}


@pytest.mark.kvm
async def test_a_bug_in_avmm_while_the_guest_runs_is_a_host_failure_with_status_6(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception out of avmm's own exit handling (here: the emulator fallback that
    an emulation failure consults) stops that VM with status 6, "a host-side failure",
    naming the exception; it never reaches the embedding program as an exception."""
    from avmm.kvm.x86 import emulation

    def buggy(*args: object) -> bool:
        raise RuntimeError("an avmm bug")

    monkeypatch.setattr(emulation, "try_emulate", buggy)
    kernel = tiny_elf(tmp_path / "jump.elf", JUMP_INTO_MMIO)
    async with VirtualMachine(guest_config("", kernel=kernel)) as vm:
        with trio.fail_after(60):
            result = await vm.wait()
    assert result.reason is StopReason.ERROR
    assert result.exit_status == HOST_FAILURE_STATUS == 6
    assert result.failed
    assert "RuntimeError: an avmm bug" in result.detail


# -- the default MAC ----------------------------------------------------------------------


async def guest_mac(name: str, namespace: TapNamespace) -> bytes:
    """The MAC the guest reads from its NIC's config space (net-echo with 0 frames only
    reports it), for a VM called ``name`` on ``namespace``'s tap without a ``mac``."""
    config = dataclasses.replace(
        guest_config("avmm.test=net-echo avmm.n=0", name=name),
        nets=(NetConfig(tap=namespace.tap, netns=namespace.netns),))
    async with VirtualMachine(config) as vm:
        with trio.fail_after(60):
            result = await vm.wait()
        output = await read_all(vm.serial)
    assert result.reason is StopReason.RESET, output
    return bytes.fromhex(guest_report(output, "net0")["mac"].replace(":", ""))


@pytest.mark.kvm
@pytest.mark.guest
async def test_the_default_mac_is_locally_administered_and_derived_from_vm_and_tap() -> None:
    require(net_problem())
    with TapNamespace("avmmtap0") as first_tap, TapNamespace("avmmtap1") as second_tap:
        web = await guest_mac("web", first_tap)
        web_again = await guest_mac("web", first_tap)
        db = await guest_mac("db", first_tap)
        web_other_tap = await guest_mac("web", second_tap)
    for mac in (web, db, web_other_tap):
        assert mac[0] & 0b10, f"{mac.hex(':')} is not locally administered"
        assert not mac[0] & 0b01, f"{mac.hex(':')} is a multicast address"
    assert web == web_again  # stable across restarts
    assert len({web, db, web_other_tap}) == 3  # the name and the tap both count
