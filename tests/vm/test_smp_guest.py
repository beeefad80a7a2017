"""The test guest's ``smp`` scenario under avmm: the guest starts its application
processors itself (INIT, SIPI, SIPI through its local APIC) and each one reports in."""

from __future__ import annotations

import pytest

from avmm import StopReason, VirtualMachine, VmExit

from .helpers import MAILBOX_ADDRESS, guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


async def run_smp_guest(vcpus: int) -> tuple[VmExit, str, int]:
    """Boot the smp scenario on ``vcpus`` vCPUs; return how it ended, its output and the
    mailbox counter (the CPUs that reported in)."""
    output = bytearray()
    async with VirtualMachine(guest_config("avmm.test=smp", vcpus=vcpus)) as vm:
        async for chunk in vm.serial:
            output += chunk
        result = await vm.wait()
        assert vm.memory is not None
        counter = vm.memory.read_u64(MAILBOX_ADDRESS + 8)
    return result, output.decode(), counter


@pytest.mark.parametrize("vcpus", [1, 2])
async def test_every_vcpu_reports_in(vcpus: int) -> None:
    result, output, counter = await run_smp_guest(vcpus)
    ids = ",".join(str(i) for i in range(vcpus))
    # The topology avmm's CPUID describes: vcpus cores, APIC ID = vCPU index.
    assert f"avmm-testguest: smp cpus={vcpus} reported={vcpus} apic_ids={ids}\n" in output
    assert "FAIL" not in output
    assert counter == vcpus
    assert result.reason is StopReason.RESET
    assert result.exit_status == 0
    assert not result.failed


async def test_a_cpu_that_never_reports_in_fails_the_scenario() -> None:
    # avmm.cpus=3 claims a CPU the VM does not have: the guest's INIT and SIPIs to APIC
    # ID 2 reach nobody, and its bounded wait ends in a failure, not a hang.
    output = bytearray()
    async with VirtualMachine(guest_config("avmm.test=smp avmm.cpus=3", vcpus=2)) as vm:
        async for chunk in vm.serial:
            output += chunk
        result = await vm.wait()
    assert output.decode().splitlines() == [
        "avmm-testguest: smp cpus=3 reported=2 apic_ids=0,1",
        "avmm-testguest: smp FAIL (2 of 3 CPUs reported in within 5000 ms)",
    ]
    assert result.reason is StopReason.DEBUG_EXIT
    assert result.exit_status == (1 << 1) | 1  # QEMU-compatible: guest code 1
