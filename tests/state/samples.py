"""State values for tests that need no /dev/kvm: shaped like what KVM returns."""

from __future__ import annotations

import random

from avmm.state import MachineState, VcpuState, VmPlatformState
from avmm.state.platform import (
    ClockState,
    IoapicState,
    PicState,
    PitChannel,
    PitState,
)
from avmm.state.vcpu import (
    CpuidLeaf,
    DebugRegs,
    DescriptorTable,
    EventException,
    EventInterrupt,
    EventNmi,
    EventSmi,
    EventTripleFault,
    Msr,
    Regs,
    Segment,
    Sregs,
    VcpuEvents,
    Xcr,
    Xcrs,
)


def _segment(selector: int, rng: random.Random) -> Segment:
    return Segment(base=rng.getrandbits(32), limit=0xFFFFF, selector=selector, type=11,
                   present=1, dpl=0, db=0, s=1, l=1, g=1, avl=0, unusable=0)


def vcpu_state(vcpu_id: int, seed: int = 1) -> VcpuState:
    rng = random.Random(seed * 1000 + vcpu_id)
    regs = Regs(*(rng.getrandbits(64) for _ in range(18)))
    sregs = Sregs(
        cs=_segment(0x10, rng), ds=_segment(0x18, rng), es=_segment(0x18, rng),
        fs=_segment(0, rng), gs=_segment(0, rng), ss=_segment(0x18, rng),
        tr=_segment(0x20, rng), ldt=_segment(0, rng),
        gdt=DescriptorTable(0x1000, 0x2F), idt=DescriptorTable(0x2000, 0),
        cr0=0x80050033, cr2=0, cr3=0x9000, cr4=0x20, cr8=0, efer=0x500,
        apic_base=0xFEE00900, interrupt_bitmap=[0, 0, 0, 0],
    )
    events = VcpuEvents(
        exception=EventException(0, 0, 0, 0, 0), interrupt=EventInterrupt(0, 0, 0, 0),
        nmi=EventNmi(0, 0, 0, 0), sipi_vector=0, flags=0xD, smi=EventSmi(0, 0, 0, 0),
        triple_fault=EventTripleFault(0), exception_has_payload=0, exception_payload=0,
    )
    return VcpuState(
        vcpu_id=vcpu_id, mp_state=0, regs=regs, sregs=sregs,
        xsave=rng.randbytes(4096), fpu=None, xcrs=Xcrs(0, [Xcr(0, 1)]),
        debugregs=DebugRegs([0, 0, 0, 0], 0xFFFF0FF0, 0x400, 0),
        lapic=rng.randbytes(1024), tsc_khz=2_600_000,
        cpuid=[CpuidLeaf(leaf, 0, 0, *(rng.getrandbits(32) for _ in range(4)))
               for leaf in range(0x20)],
        msrs=[Msr(index, rng.getrandbits(64)) for index in range(0x10, 0x50)],
        msrs_refused=[0xDEAD], events=events,
    )


def platform_state() -> VmPlatformState:
    pic = PicState(*range(16))
    return VmPlatformState(
        pic_master=pic, pic_slave=pic,
        ioapic=IoapicState(0xFEC00000, 0, 0, 0, [0x10000 + i for i in range(24)]),
        pit=PitState([PitChannel(65536, 0, 0, 0, 0, 0, 0, 0, 3, 2, 0, 1, -5)] * 3, 0),
        clock=ClockState(123456789, 0, 0, 0),
    )


def machine_state(vcpus: int = 2) -> MachineState:
    return MachineState(platform=platform_state(),
                        vcpus=[vcpu_state(i) for i in range(vcpus)])
