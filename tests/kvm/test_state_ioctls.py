"""The ioctls a snapshot needs, one method each: XSAVE, XCRs, debug registers, TSC rate,
the CPUID a vCPU was given, partial MSR reads, irqchip, PIT, kvmclock, and finishing an
I/O exit without running the guest."""

from __future__ import annotations

import pytest

from avmm.kvm import exits, structs
from avmm.kvm.vm import ioapic_redirection_table, irqchip_ioapic, irqchip_pic
from avmm.x86_vcpu import MSR_LSTAR

from .guest import run

pytestmark = pytest.mark.kvm

UD2 = b"\x0f\x0b"
#: Where the legacy region of an XSAVE area keeps XMM0 (the FXSAVE layout).
XSAVE_XMM0 = 160
#: The XSAVE header's XSTATE_BV (which components hold other than their initial state).
XSTATE_BV = 512
XSTATE_SSE = 1 << 1


def test_xsave_carries_the_sse_registers(make_guest):
    vm, vcpu, _ = make_guest(UD2)
    area = vcpu.get_xsave()
    assert len(area) == structs.XSAVE_LEGACY_SIZE == 4096
    size = vm.check_extension("KVM_CAP_XSAVE2")
    if size:
        assert vcpu.get_xsave2(size)[:4096] == area

    changed = bytearray(area)
    changed[XSAVE_XMM0:XSAVE_XMM0 + 16] = bytes(range(1, 17))
    changed[XSTATE_BV] |= XSTATE_SSE  # XMM0 holds data: SSE is not in its initial state
    vcpu.set_xsave(bytes(changed))
    assert vcpu.get_xsave()[XSAVE_XMM0:XSAVE_XMM0 + 16] == bytes(range(1, 17))
    assert bytes(vcpu.get_fpu().xmm[0]) == bytes(range(1, 17))


def test_set_xsave_refuses_an_area_of_the_wrong_size(make_guest):
    vm, vcpu, _ = make_guest(UD2)
    with pytest.raises(ValueError, match="has 100"):
        vcpu.set_xsave(bytes(100))
    too_long = max(vm.check_extension("KVM_CAP_XSAVE2"), 4096) + 64
    with pytest.raises(ValueError, match=f"has {too_long}"):
        vcpu.set_xsave(bytes(too_long))


def test_xcrs_round_trip(make_guest):
    _, vcpu, _ = make_guest(UD2)
    xcrs = vcpu.get_xcrs()
    assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].xcr == 0
    assert xcrs.xcrs[0].value & 1  # x87 state is always enabled in XCR0
    xcrs.xcrs[0].value = 0x3  # x87 and SSE
    vcpu.set_xcrs(xcrs)
    assert vcpu.get_xcrs().xcrs[0].value == 0x3


def test_debugregs_round_trip(make_guest):
    _, vcpu, _ = make_guest(UD2)
    debugregs = vcpu.get_debugregs()
    assert debugregs.dr7 & 0x400  # bit 10 reads as 1
    debugregs.db[2] = 0x1234_5000
    debugregs.dr7 = 0x400 | (1 << 4)  # L2: breakpoint 2 enabled
    vcpu.set_debugregs(debugregs)
    again = vcpu.get_debugregs()
    assert (again.db[2], again.dr7) == (0x1234_5000, 0x410)


def test_tsc_khz_reads_and_sets_its_own_rate(make_guest):
    _, vcpu, _ = make_guest(UD2)
    khz = vcpu.get_tsc_khz()
    assert khz > 100_000  # a TSC slower than 100 MHz is not one KVM runs guests on
    vcpu.set_tsc_khz(khz)  # its own rate needs no scaling, so every KVM takes it
    assert vcpu.get_tsc_khz() == khz
    with pytest.raises(ValueError):
        vcpu.set_tsc_khz(0)


def test_get_cpuid2_is_what_set_cpuid2_gave(make_guest):
    _, vcpu, _ = make_guest(UD2)
    given = vcpu.get_cpuid2()
    assert given and any(entry.function == 0 for entry in given)
    shorter = [entry for entry in given if entry.function != 0x8000_0008]
    vcpu.set_cpuid2(shorter)
    assert vcpu.get_cpuid2() == shorter


def test_read_msrs_stops_at_the_first_refused_one(make_guest):
    _, vcpu, _ = make_guest(UD2)
    refused = 0xDEAD_BEEF  # no CPU has it
    got = vcpu.read_msrs([MSR_LSTAR, 0x10, refused, 0xC000_0081])
    assert list(got) == [MSR_LSTAR, 0x10]
    assert vcpu.read_msrs([]) == {}


def test_irqchip_round_trip(make_guest):
    vm, _, _ = make_guest(UD2)
    slave_imr = irqchip_pic(vm.get_irqchip(structs.IRQCHIP_PIC_SLAVE)).imr
    master = vm.get_irqchip(structs.IRQCHIP_PIC_MASTER)
    irqchip_pic(master).imr = slave_imr ^ 0xFB
    vm.set_irqchip(master)
    assert irqchip_pic(vm.get_irqchip(structs.IRQCHIP_PIC_MASTER)).imr == slave_imr ^ 0xFB
    assert irqchip_pic(vm.get_irqchip(structs.IRQCHIP_PIC_SLAVE)).imr == slave_imr

    chip = vm.get_irqchip(structs.IRQCHIP_IOAPIC)
    ioapic = irqchip_ioapic(chip)
    assert ioapic.base_address == 0xFEC0_0000
    ioapic_redirection_table(ioapic)[5] = 0xA025  # level-triggered vector 0x25, unmasked
    vm.set_irqchip(chip)
    again = irqchip_ioapic(vm.get_irqchip(structs.IRQCHIP_IOAPIC))
    assert ioapic_redirection_table(again)[5] == 0xA025
    assert ioapic_redirection_table(again)[4] == 0x1_0000  # masked, as KVM resets it


def test_pit2_round_trip(make_guest):
    vm, _, _ = make_guest(UD2)
    vm.create_pit2()
    pit = vm.get_pit2()
    pit.channels[2].count = 1000
    pit.channels[2].mode = 2
    vm.set_pit2(pit)
    again = vm.get_pit2()
    assert (again.channels[2].count, again.channels[2].mode) == (1000, 2)


def test_clock_is_set_and_moves_on(make_guest):
    vm, _, _ = make_guest(UD2)
    vm.set_clock(10**12)
    clock = vm.get_clock()
    assert 10**12 <= clock.clock < 10**12 + 60 * 10**9
    with pytest.raises(ValueError, match="KVM_CLOCK_REALTIME"):
        vm.set_clock(10**12, flags=structs.CLOCK_TSC_STABLE)


def test_complete_pending_io_finishes_an_in_without_running_on(make_guest):
    # mov dx, 0x1234 ; in al, dx ; mov dx, 0x5678 ; out dx, al ; ud2
    code = bytes.fromhex("66ba3412 ec 66ba7856 ee") + UD2
    _, vcpu, _ = make_guest(code)
    event = run(vcpu)
    assert isinstance(event, exits.IoIn) and event.port == 0x1234
    event.buffer[:] = b"\x5a"

    assert vcpu.complete_pending_io() is None
    regs = vcpu.get_regs()
    assert regs.rax & 0xFF == 0x5A  # the in took the data ...
    assert regs.rip == 0x100000 + 5  # ... and stopped right after it
    assert run(vcpu) == exits.IoOut(0x5678, 1, 1, b"\x5a")


def test_complete_pending_io_keeps_immediate_exit(make_guest):
    _, vcpu, _ = make_guest(UD2)
    vcpu.set_immediate_exit(True)
    vcpu.complete_pending_io()
    assert run(vcpu) == exits.Interrupted()  # still set: KVM_RUN returns at once
    vcpu.set_immediate_exit(False)
    vcpu.complete_pending_io()
    assert run(vcpu) == exits.Shutdown()  # cleared again: the guest runs (ud2, no IDT)
