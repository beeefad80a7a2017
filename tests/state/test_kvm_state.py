"""vCPU and platform state through KVM: saved, encoded, decoded and restored into a new
VM, it reads back the same; the orders KVM needs are kept; what KVM refuses is named."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from avmm.kvm import exits, structs
from avmm.kvm.vm import ioapic_redirection_table, irqchip_ioapic, irqchip_pic
from avmm.state import (
    SnapshotError,
    StateCompatibilityError,
    VcpuState,
    VmPlatformState,
    check_vcpu_restorable,
    restore_machine,
    restore_platform,
    restore_vcpu,
    save_machine,
    save_platform,
    save_vcpu,
)
from avmm.state.codec import decode, encode
from avmm.state.vcpu import (
    MSR_EFER,
    MSR_IA32_APICBASE,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    MSR_KERNEL_GS_BASE,
    MSR_KVM_SYSTEM_TIME_NEW,
    MSR_KVM_WALL_CLOCK_NEW,
    MSR_LSTAR,
    MSR_STAR,
    Msr,
    saved_msr_indices,
)
from tests.kvm.guest import CODE_ADDRESS, DATA_ADDRESS, Guest, boot_guest, run

pytestmark = pytest.mark.kvm

UD2 = b"\x0f\x0b"
APIC_TPR = 0x80
APIC_LVT_TIMER = 0x320
LVT_TIMER_TSC_DEADLINE = 0b10 << 17
TSC_HZ_PER_KHZ = 1000


@pytest.fixture
def guests() -> Iterator[ExitStack]:
    with ExitStack() as cleanup:
        yield cleanup


def _guest(cleanup: ExitStack, code: bytes = UD2) -> Guest:
    guest = boot_guest(cleanup, code)
    guest.vm.create_pit2()
    return guest


def _through_the_codec(state: object) -> object:
    return decode(encode(state), type(state))


def _lapic_u32(lapic: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(lapic[offset:offset + 4], "little")


def _set_lapic_u32(vcpu, offset: int, value: int) -> None:
    lapic = vcpu.get_lapic()
    lapic[offset:offset + 4] = value.to_bytes(4, "little")
    vcpu.set_lapic(lapic)


def _dirty_vcpu(guest: Guest) -> None:
    """Give every part of the vCPU state a value a fresh vCPU does not have."""
    vcpu = guest.vcpu
    regs = vcpu.get_regs()
    regs.rax, regs.r15, regs.rflags = 0x1122_3344_5566_7788, 0xFEDC_BA98, 0x246
    vcpu.set_regs(regs)
    sregs = vcpu.get_sregs()
    sregs.cr2 = 0xDEAD_B000
    vcpu.set_sregs(sregs)
    area = bytearray(vcpu.get_xsave())
    area[160:176] = bytes(range(16))  # XMM0
    area[512] |= 2  # XSTATE_BV: SSE holds data
    vcpu.set_xsave(bytes(area))
    debugregs = vcpu.get_debugregs()
    debugregs.db[1] = 0x7000
    debugregs.dr7 = 0x404
    vcpu.set_debugregs(debugregs)
    _set_lapic_u32(vcpu, APIC_TPR, 0x20)
    vcpu.set_msrs({MSR_LSTAR: 0xFFFF_FFFF_8100_0000, MSR_STAR: 0x0023_0010_0000_0000,
                   MSR_KERNEL_GS_BASE: 0xFFFF_8880_0000_1000,
                   MSR_KVM_SYSTEM_TIME_NEW: DATA_ADDRESS | 1,
                   MSR_KVM_WALL_CLOCK_NEW: DATA_ADDRESS + 0x100})
    events = vcpu.get_vcpu_events()
    events.exception.injected = 1
    events.exception.nr = 13  # #GP with an error code, to be delivered on the next entry
    events.exception.has_error_code = 1
    events.exception.error_code = 0x18
    events.nmi.pending = 1
    events.flags = structs.VCPUEVENT_VALID_NMI_PENDING
    vcpu.set_vcpu_events(events)


def _without_tsc(state: VcpuState) -> VcpuState:
    """The state less what moves on by itself between two reads: the TSC."""
    return dataclasses.replace(state, msrs=[m for m in state.msrs if m.index != MSR_IA32_TSC])


def test_saved_msrs_include_what_a_guest_relies_on(guests):
    guest = _guest(guests)
    indices = saved_msr_indices(guest.vm.kvm)
    for index in (MSR_IA32_TSC, MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_WALL_CLOCK_NEW,
                  MSR_IA32_APICBASE, MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_IA32_TSC_DEADLINE,
                  MSR_IA32_MISC_ENABLE):
        assert index in indices
    assert indices.index(MSR_IA32_TSC) < indices.index(MSR_IA32_TSC_DEADLINE)
    state = save_vcpu(guest.vcpu)
    assert state.msr(MSR_IA32_TSC) is not None and state.msr(MSR_EFER) is not None
    assert [m.index for m in state.msrs] + state.msrs_refused \
        == [i for i in indices if i in {m.index for m in state.msrs} | set(state.msrs_refused)]


def test_msrs_kvm_will_not_read_are_recorded_not_hidden(guests):
    guest = _guest(guests)
    refused = 0xDEAD_BEEF
    state = save_vcpu(guest.vcpu, msr_indices=[MSR_IA32_TSC, refused, MSR_LSTAR, refused + 1])
    assert [m.index for m in state.msrs] == [MSR_IA32_TSC, MSR_LSTAR]
    assert state.msrs_refused == [refused, refused + 1]


def test_vcpu_state_comes_back_in_a_new_vm(guests):
    source = _guest(guests)
    _dirty_vcpu(source)
    saved = save_vcpu(source.vcpu)
    assert saved.events.exception.nr == 13 and saved.events.nmi.pending == 1
    assert saved.xsave is not None and saved.xsave[160:176] == bytes(range(16))

    target = _guest(guests)
    restore_vcpu(target.vcpu, _through_the_codec(saved))
    again = save_vcpu(target.vcpu)
    assert _without_tsc(again) == _without_tsc(saved)
    # The TSC goes on from the saved value (at most a minute of this test later).
    elapsed = again.msr(MSR_IA32_TSC) - saved.msr(MSR_IA32_TSC)
    assert 0 <= elapsed < 60 * saved.tsc_khz * TSC_HZ_PER_KHZ


def test_the_tsc_deadline_survives_because_the_lapic_is_restored_first(guests):
    """KVM only keeps a TSC deadline when the LAPIC timer is in TSC-deadline mode: the
    MSRs must go in after the LAPIC."""
    source = _guest(guests)
    vcpu = source.vcpu
    _set_lapic_u32(vcpu, APIC_LVT_TIMER, LVT_TIMER_TSC_DEADLINE | 0xEC)
    deadline = vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC] + 10**15
    vcpu.set_msrs({MSR_IA32_TSC_DEADLINE: deadline})
    saved = save_vcpu(vcpu)
    assert saved.msr(MSR_IA32_TSC_DEADLINE) == deadline

    target = _guest(guests)
    restore_vcpu(target.vcpu, saved)
    assert target.vcpu.get_msrs([MSR_IA32_TSC_DEADLINE])[MSR_IA32_TSC_DEADLINE] == deadline


def test_an_answered_in_is_finished_before_the_save(guests):
    """A vCPU saved right after userspace answered an ``in``: the restored guest has the
    data in AL and goes on after the ``in``, it does not execute it again."""
    # mov dx, 0x1234 ; in al, dx ; mov dx, 0x5678 ; out dx, al ; ud2
    code = bytes.fromhex("66ba3412 ec 66ba7856 ee") + UD2
    source = _guest(guests, code)
    event = run(source.vcpu)
    assert isinstance(event, exits.IoIn) and event.port == 0x1234
    event.buffer[:] = b"\x5a"
    saved = save_vcpu(source.vcpu)

    target = _guest(guests, code)
    restore_vcpu(target.vcpu, saved)
    assert target.vcpu.get_regs().rip == CODE_ADDRESS + 5
    assert run(target.vcpu) == exits.IoOut(0x5678, 1, 1, b"\x5a")


def test_platform_state_comes_back_in_a_new_vm(guests):
    source = _guest(guests)
    vm = source.vm
    master = vm.get_irqchip(structs.IRQCHIP_PIC_MASTER)
    irqchip_pic(master).imr = 0xFA
    irqchip_pic(master).irq_base = 0x20
    vm.set_irqchip(master)
    chip = vm.get_irqchip(structs.IRQCHIP_IOAPIC)
    ioapic_redirection_table(irqchip_ioapic(chip))[9] = 0xA031
    vm.set_irqchip(chip)
    pit = vm.get_pit2()
    pit.channels[0].count = 4321
    pit.channels[0].mode = 2
    vm.set_pit2(pit)
    vm.set_clock(5 * 10**12)
    saved = save_platform(vm)
    assert saved.pic_master.imr == 0xFA and saved.ioapic.redirtbl[9] == 0xA031
    assert saved.pit is not None and saved.pit.channels[0].count == 4321

    target = _guest(guests)
    restore_platform(target.vm, _through_the_codec(saved))
    again = save_platform(target.vm)
    assert (again.pic_master, again.pic_slave, again.ioapic) == (
        saved.pic_master, saved.pic_slave, saved.ioapic)
    assert again.pit is not None
    # KVM restarts the count on a load: everything but the reload time comes back.
    assert [dataclasses.replace(c, count_load_time=0) for c in again.pit.channels] == [
        dataclasses.replace(c, count_load_time=0) for c in saved.pit.channels]
    assert saved.clock.clock <= again.clock.clock < saved.clock.clock + 60 * 10**9


def test_a_vm_without_a_pit_saves_none(guests):
    guest = boot_guest(guests, UD2)  # irqchip, no PIT
    assert save_platform(guest.vm).pit is None


def test_state_for_another_vcpu_is_refused(guests):
    source = _guest(guests)
    saved = dataclasses.replace(save_vcpu(source.vcpu), vcpu_id=1)
    with pytest.raises(SnapshotError, match=r"^the state of vcpu 1 cannot be restored into "
                                            r"vcpu 0$"):
        restore_vcpu(_guest(guests).vcpu, saved)


def test_an_msr_kvm_refuses_is_named(guests):
    saved = save_vcpu(_guest(guests).vcpu)
    forged = dataclasses.replace(saved, msrs=[*saved.msrs, Msr(0xDEAD_BEEF, 0)])
    with pytest.raises(StateCompatibilityError) as caught:
        restore_vcpu(_guest(guests).vcpu, forged)
    assert str(caught.value).startswith("vcpu 0: KVM refused the saved MSRs: KVM_SET_MSRS")
    assert "0xdeadbeef" in str(caught.value)


def test_a_lapic_of_the_wrong_size_is_named(guests):
    saved = dataclasses.replace(save_vcpu(_guest(guests).vcpu), lapic=bytes(100))
    with pytest.raises(SnapshotError, match=r"^vcpu 0: the saved LAPIC does not fit: 100 "
                                            r"bytes, KVM's LAPIC page has 1024$"):
        restore_vcpu(_guest(guests).vcpu, saved)


def test_what_this_host_cannot_run_is_listed(guests):
    saved = save_vcpu(_guest(guests).vcpu)
    assert check_vcpu_restorable(_guest(guests).vcpu, saved) == []

    leaf7 = next(leaf for leaf in saved.cpuid if (leaf.function, leaf.index) == (7, 0))
    everything = dataclasses.replace(leaf7, ebx=0xFFFF_FFFF)
    greedy = dataclasses.replace(
        saved, cpuid=[everything if leaf is leaf7 else leaf for leaf in saved.cpuid],
        xsave=bytes(1 << 20))
    problems = check_vcpu_restorable(_guest(guests).vcpu, greedy)
    assert len(problems) == 2, problems
    assert problems[0].startswith("vcpu 0: the guest used CPUID leaf 0x7.0 EBX bits ")
    assert "XSAVE area is 1048576 bytes" in problems[1]


def test_a_tsc_rate_kvm_cannot_give_is_listed(guests):
    guest = _guest(guests)
    saved = save_vcpu(guest.vcpu)
    assert saved.tsc_khz is not None
    faster = dataclasses.replace(saved, tsc_khz=saved.tsc_khz * 2)
    problems = check_vcpu_restorable(_guest(guests).vcpu, faster)
    if guest.vm.kvm.check_extension("KVM_CAP_TSC_CONTROL"):
        assert problems == []  # KVM scales the guest's TSC: restore_vcpu sets the rate
        target = _guest(guests)
        restore_vcpu(target.vcpu, faster)
        assert target.vcpu.get_tsc_khz() == saved.tsc_khz * 2
    else:
        assert problems == [f"vcpu 0: the guest's TSC ran at {saved.tsc_khz * 2} kHz, this "
                            f"host's at {guest.vcpu.get_tsc_khz()} kHz, and KVM cannot "
                            "scale it (no KVM_CAP_TSC_CONTROL)"]


def test_cpuid_problems_ignore_bits_kvm_mirrors_from_registers():
    from avmm.kvm import CpuidEntry
    from avmm.state.vcpu import CpuidLeaf, cpuid_problems

    osxsave = 1 << 27
    saved = [CpuidLeaf(1, 0, 0, 0, 0, osxsave | 1, 0)]
    assert cpuid_problems(saved, [CpuidEntry(1, 0, 0, 0, 0, 1, 0)]) == []
    assert cpuid_problems(saved, [CpuidEntry(1, 0, 0, 0, 0, 0, 0)]) == [
        "CPUID leaf 0x1.0 ECX bits 0"]


def test_state_types_hold_plain_data_only(guests):
    """No cffi object may hide in the state: every leaf is an int, bytes or None."""
    guest = _guest(guests)

    def leaves(value: object) -> Iterator[object]:
        if dataclasses.is_dataclass(value):
            for field in dataclasses.fields(value):
                yield from leaves(getattr(value, field.name))
        elif isinstance(value, list):
            for item in value:
                yield from leaves(item)
        else:
            yield value

    for state in (save_vcpu(guest.vcpu), save_platform(guest.vm)):
        assert isinstance(state, VcpuState | VmPlatformState)
        kinds = {type(leaf) for leaf in leaves(state)}
        assert kinds <= {int, bytes, type(None)}, kinds


def test_a_machine_this_host_cannot_run_is_refused_before_anything_is_set(guests):
    source = _guest(guests)
    saved = save_machine(source.vm, [source.vcpu])
    without_pit = boot_guest(guests, UD2)
    with pytest.raises(StateCompatibilityError, match=(
            r"^this host cannot restore the snapshot: the snapshot's VM has a PIT; the VM "
            r"being restored has none$")):
        restore_machine(without_pit.vm, [without_pit.vcpu], saved)
    with pytest.raises(StateCompatibilityError, match="the snapshot has 1 vCPUs; the VM "
                                                      "being restored has 0"):
        restore_machine(without_pit.vm, [], saved)
    target = _guest(guests)
    restore_machine(target.vm, [target.vcpu], saved)
    assert target.vcpu.get_regs().rip == saved.vcpus[0].regs.rip


def test_a_platform_state_that_does_not_fit_kvm_is_named(guests):
    saved = save_platform(_guest(guests).vm)
    short = dataclasses.replace(saved, ioapic=dataclasses.replace(saved.ioapic,
                                                                  redirtbl=[0] * 23))
    with pytest.raises(SnapshotError, match=r"^ioapic\.redirtbl: has 23 pins; KVM's IOAPIC "
                                            r"has 24$"):
        restore_platform(_guest(guests).vm, short)
    wide = dataclasses.replace(saved, pit=dataclasses.replace(saved.pit, channels=[]))
    with pytest.raises(SnapshotError, match=r"^pit\.channels: has 0 entries; KVM's struct "
                                            r"has 3$"):
        restore_platform(_guest(guests).vm, wide)
