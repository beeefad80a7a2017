"""Boot the test guest inside a trio program and check how VMs start, run and stop."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmExit, VmStartError
from avmm.config import SerialConfig
from tests.virtio_guest_support import expected_pattern

from .guest_report import guest_report
from .helpers import MAILBOX_ADDRESS, MAILBOX_MAGIC, guest_config, tiny_elf

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


async def run_guest(cmdline: str, **options: object) -> tuple[VmExit, str]:
    """Boot the test guest with ``cmdline``; return how it ended and all its output."""
    output = bytearray()
    async with VirtualMachine(guest_config(cmdline, **options)) as vm:  # type: ignore[arg-type]
        async for chunk in vm.serial:
            output += chunk
        result = await vm.wait()
    return result, output.decode()


def vcpu_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "vcpu" in t.name and "avmm" in t.name]


async def test_hello_prints_and_shuts_down_cleanly() -> None:
    result, output = await run_guest("console=ttyS0 avmm.test=hello marker=abc")
    assert output.splitlines() == [
        "avmm-testguest: hello",
        "avmm-testguest: cmdline: console=ttyS0 avmm.test=hello marker=abc",
    ]
    assert result.reason is StopReason.RESET
    assert result.exit_status == 0
    assert not result.failed


async def test_count_runs_in_ring3_and_reports_through_the_mailbox() -> None:
    n = 50_000_000
    async with VirtualMachine(guest_config(f"avmm.test=count avmm.n={n}")) as vm:
        result = await vm.wait()
        assert vm.memory is not None
        assert vm.memory.read_u64(MAILBOX_ADDRESS) == MAILBOX_MAGIC
        assert vm.memory.read_u64(MAILBOX_ADDRESS + 8) == n
        assert vm.memory.read_u64(MAILBOX_ADDRESS + 16) == 1  # done
        output = (await vm.serial.receive_some()).decode()
    assert f"avmm-testguest: count done n={n}" in output
    assert result.reason is StopReason.RESET


@pytest.mark.parametrize(
    ("cmdline", "guest_code", "expected_line"),
    [
        ("avmm.test=no-such-scenario", 2, "unknown scenario no-such-scenario"),
        ("avmm.test=fault avmm.fault=ud", 3, "exception 6 "),
        ("avmm.test=count avmm.n=12x", 1, ""),
    ],
)
async def test_debug_exit_status_is_qemu_compatible(
    cmdline: str, guest_code: int, expected_line: str
) -> None:
    result, output = await run_guest(cmdline)
    assert result.reason is StopReason.DEBUG_EXIT
    assert result.exit_status == (guest_code << 1) | 1
    assert expected_line in output


async def test_triple_fault_stops_the_vm_with_rip_and_instruction_bytes(tmp_path: Path) -> None:
    # ud2 with the boot IDT's limit of 0: #UD cannot be delivered → #DF → triple fault.
    kernel = tiny_elf(tmp_path / "ud2.elf", b"\x0f\x0b")
    result, _ = await run_guest("", kernel=kernel)
    assert result.reason is StopReason.TRIPLE_FAULT
    assert result.failed
    assert result.exit_status == 4
    assert "rip=0x100000" in result.detail
    assert "0f 0b" in result.detail
    assert result.vcpu == 0


async def test_stop_ends_a_running_guest_and_joins_its_threads() -> None:
    config = guest_config("avmm.test=count avmm.n=100000000000000")
    async with VirtualMachine(config) as vm:
        assert vm.memory is not None
        with trio.fail_after(30):
            while vm.memory.read_u64(MAILBOX_ADDRESS + 8) == 0:  # wait for real progress
                await trio.sleep(0.01)
        vm.stop("test is done")
        with trio.fail_after(30):
            result = await vm.wait()
        assert vm.memory.read_u64(MAILBOX_ADDRESS + 16) == 0  # not finished
    assert result.reason is StopReason.STOPPED
    assert result.detail == "test is done"
    assert result.exit_status == 0
    assert vcpu_threads() == []


async def test_cancelling_the_callers_scope_stops_the_vm() -> None:
    vm = VirtualMachine(guest_config("avmm.test=count avmm.n=100000000000000"))
    with trio.CancelScope() as scope:
        async with vm:
            # The deadline from here, once the VM runs: set before the build, it could
            # fall inside a slow build on a loaded host and cancel that instead.
            scope.deadline = trio.current_time() + 0.5
            await vm.wait()
    assert scope.cancelled_caught
    assert vm.exit is not None
    assert vm.exit.reason is StopReason.STOPPED
    assert vcpu_threads() == []


async def test_leaving_the_context_stops_the_vm() -> None:
    async with VirtualMachine(guest_config("avmm.test=count avmm.n=100000000000000")) as vm:
        await trio.sleep(0.1)
    assert vm.exit is not None
    assert vm.exit.reason is StopReason.STOPPED


async def test_several_vms_run_concurrently_each_with_its_own_output() -> None:
    results: dict[int, tuple[VmExit, str]] = {}

    async def one(i: int) -> None:
        results[i] = await run_guest(f"avmm.test=hello vm-number={i}")

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, i)
    for i in range(4):
        result, output = results[i]
        assert result.reason is StopReason.RESET
        assert f"cmdline: avmm.test=hello vm-number={i}\n" in output
        for other in set(range(4)) - {i}:
            assert f"vm-number={other}" not in output


async def test_a_crashing_vm_does_not_disturb_its_neighbour(tmp_path: Path) -> None:
    kernel = tiny_elf(tmp_path / "ud2.elf", b"\x0f\x0b")
    outcomes: dict[str, tuple[VmExit, str]] = {}

    async def crash() -> None:
        outcomes["crash"] = await run_guest("", kernel=kernel)

    async def count() -> None:
        outcomes["count"] = await run_guest("avmm.test=count avmm.n=300000000")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count)
        nursery.start_soon(crash)
    assert outcomes["crash"][0].reason is StopReason.TRIPLE_FAULT
    assert outcomes["count"][0].reason is StopReason.RESET
    assert "count done n=300000000" in outcomes["count"][1]


async def test_serial_file_mode_writes_the_guest_output(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    result, streamed = await run_guest(
        "avmm.test=hello", serial=SerialConfig(mode="file", path=log)
    )
    assert result.reason is StopReason.RESET
    assert log.read_text() == streamed
    assert "avmm-testguest: hello\n" in streamed


@pytest.mark.parametrize("vcpus", [2])
async def test_more_vcpus_boot(vcpus: int) -> None:
    result, output = await run_guest("avmm.test=hello", vcpus=vcpus)
    assert result.reason is StopReason.RESET
    assert "avmm-testguest: hello" in output


async def test_compat_cpu_profile_boots() -> None:
    result, output = await run_guest("avmm.test=hello", cpu_profile="compat")
    assert result.reason is StopReason.RESET
    assert "avmm-testguest: hello" in output


async def test_exits_are_counted() -> None:
    async with VirtualMachine(guest_config("avmm.test=hello")) as vm:
        await vm.wait()
        counts = vm.vcpu_exit_counts()
    # Every byte of output is at least one THR write plus LSR polling.
    assert counts["IoOut"] >= len("avmm-testguest: hello\n")
    assert counts["IoIn"] >= 1


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_a_bad_kernel_fails_to_start_naming_the_step_and_leaks_nothing(
    tmp_path: Path,
) -> None:
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"MZ" + bytes(4094))
    before = _open_fds()
    with pytest.raises(VmStartError) as caught:
        async with VirtualMachine(guest_config("", kernel=kernel)):
            pytest.fail("the VM must not start")
    assert caught.value.step.startswith("loading the kernel")
    assert str(kernel) in str(caught.value)
    assert _open_fds() == before


async def test_a_vm_object_starts_only_once() -> None:
    vm = VirtualMachine(guest_config("avmm.test=hello"))
    async with vm:
        await vm.wait()
    with pytest.raises(Exception, match="already started"):
        async with vm:
            pass


HIGH_RAM = 4 << 30
#: 3.5 GiB of RAM: 3 GiB below the MMIO hole, 512 MiB from 4 GiB up (the memfd is sparse).
BIG_MEMORY_MIB = 3584


@pytest.mark.parametrize("address", [HIGH_RAM, HIGH_RAM + (512 << 20) - (1 << 20)],
                         ids=["first-MiB-above-4GiB", "last-MiB-of-RAM"])
async def test_the_guest_writes_and_reads_ram_above_the_mmio_hole(address: int) -> None:
    """RAM above 4 GiB is guest RAM for real: a token the host puts there before the
    guest runs is what the guest reads, and the pattern the guest writes there (through
    its own page tables, from ring 3) is what the host reads at that guest address."""
    size, seed = 1 << 20, 9
    token = 0x5AFE_0000_0000_0000 | address
    config = guest_config(f"avmm.test=high-mem avmm.addr={address:#x} avmm.size={size} "
                          f"avmm.seed={seed}", memory_mib=BIG_MEMORY_MIB)
    async with VirtualMachine(config, start_paused=True) as vm:
        assert vm.memory is not None
        assert [(r.guest_address, r.size) for r in vm.memory.regions] == [
            (0, 3 << 30), (HIGH_RAM, (BIG_MEMORY_MIB << 20) - (3 << 30))]
        vm.memory.write(address, token.to_bytes(8, "little"))
        await vm.resume()
        result = await vm.wait()
        host_view = vm.memory.read(address, size)
        output = b"".join([chunk async for chunk in vm.serial]).decode()
    assert result.reason is StopReason.RESET, (result, output)
    report = guest_report(output, "high-mem")
    assert report == {"addr": f"{address:#x}", "size": str(size), "before": f"{token:#x}",
                      "verify": "ok"}
    assert host_view == expected_pattern(seed, size // 512)


async def test_without_ram_above_4gib_the_guest_reads_no_memory_there() -> None:
    """The counter-test: with 32 MiB the same access reaches no RAM (the unclaimed
    MMIO space answers all-ones and drops writes), so the guest's check fails. This is
    what the test above would see if avmm did not map the high region."""
    result, output = await run_guest(f"avmm.test=high-mem avmm.addr={HIGH_RAM:#x} "
                                     "avmm.size=512")
    assert result.reason is StopReason.DEBUG_EXIT, output
    assert "high-mem verify=FAIL offset=0x0" in output


async def test_kvm_tears_the_vm_down_off_the_event_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing KVM's VM fd destroys the VM inside close() (tens of milliseconds on
    some hosts): leaving a VM's context does it in a worker thread, never on the event
    loop that serves every other VM; guest RAM goes the same way, and both are gone
    by the time the context is left."""
    from avmm.kvm.vm import Vm
    from avmm.memory import GuestMemory

    closed: dict[str, int] = {}
    close_vm, close_memory = Vm.close, GuestMemory.close

    def vm_close(self: Vm) -> None:
        closed.setdefault("vm", threading.get_ident())
        close_vm(self)

    def memory_close(self: GuestMemory) -> None:
        closed.setdefault("memory", threading.get_ident())
        close_memory(self)

    monkeypatch.setattr(Vm, "close", vm_close)
    monkeypatch.setattr(GuestMemory, "close", memory_close)
    loop_thread = threading.get_ident()
    result, output = await run_guest("console=ttyS0 avmm.test=hello")
    assert result.reason is StopReason.RESET, (result, output)
    assert set(closed) == {"vm", "memory"}, closed
    assert loop_thread not in closed.values(), "closed on the event loop's thread"
