"""Preparing x86 vCPUs for boot: CPUID, MSRs, FPU, LAPIC, and the boot registers.

Glue between the plain descriptions of :mod:`avmm.arch.x86` and the KVM binding: the
arch layer says *what* the boot CPU looks like; this module writes it into ``kvm_regs``,
``kvm_sregs`` and friends.
"""

from __future__ import annotations

from typing import Any

from .arch.x86.boot_cpu import BootCpuState
from .arch.x86.gdt import Segment
from .kvm import Vcpu
from .kvm._kvm_ffi import lib

# MSRs every boot vCPU starts with (architectural reset values where it matters).
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRITE_BACK = 6

BOOT_MSRS: dict[int, int] = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_CSTAR: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    # Without firmware nobody programs the MTRRs: make all memory write-back by default,
    # or the guest would run uncached.
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRITE_BACK,
}

# LAPIC local vector table: the boot CPU's LINT0 receives the PIC's ExtINT, every CPU's
# LINT1 the NMI, and an application processor's LINT0 is masked: the wiring a PC's
# firmware leaves behind (MP spec 1.4, "virtual wire mode" on the BSP only).
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_DELIVERY_MODE_EXTINT = 0x7 << 8
APIC_DELIVERY_MODE_NMI = 0x4 << 8
APIC_DELIVERY_MODE_MASK = 0x7 << 8
APIC_LVT_MASKED = 1 << 16

FPU_CONTROL_WORD = 0x37F  # all x87 exceptions masked, 64-bit precision
MXCSR_DEFAULT = 0x1F80  # all SSE exceptions masked (the reset value)


def configure_platform_state(vcpu: Vcpu, *, boot_cpu: bool = True) -> None:
    """MSRs, FPU and LAPIC for any vCPU: the boot CPU (``boot_cpu``) or an application
    processor, whose LINT0 is masked (see the LVT note above)."""
    vcpu.set_msrs(BOOT_MSRS)

    fpu = vcpu.get_fpu()
    fpu.fcw = FPU_CONTROL_WORD
    # MXCSR is not set here: KVM's FPU ioctls ignore it, and a new vCPU already has the
    # reset value MXCSR_DEFAULT.
    vcpu.set_fpu(fpu)

    lapic = vcpu.get_lapic()
    _set_lvt_delivery_mode(lapic, APIC_LVT_LINT0, APIC_DELIVERY_MODE_EXTINT,
                           masked=not boot_cpu)
    _set_lvt_delivery_mode(lapic, APIC_LVT_LINT1, APIC_DELIVERY_MODE_NMI)
    vcpu.set_lapic(lapic)


def wait_for_sipi(vcpu: Vcpu) -> None:
    """Leave an application processor in wait-for-SIPI (``KVM_MP_STATE_UNINITIALIZED``).

    This is where KVM already puts every vCPU but the first when the VM has an in-kernel
    irqchip; saying so keeps it true whatever ran before. KVM_RUN on such a vCPU sleeps in
    the kernel until the boot CPU's LAPIC sends it INIT and a startup IPI (the guest's
    SMP bring-up); then it starts in real mode at the SIPI vector's page. A kick (signal)
    still gets it out of KVM_RUN, so stopping the VM never waits for a parked AP.
    """
    vcpu.set_mp_state(lib.KVM_MP_STATE_UNINITIALIZED)


def apply_boot_state(vcpu: Vcpu, state: BootCpuState) -> None:
    """Load the boot CPU's registers (64-bit boot protocol entry state)."""
    sregs = vcpu.get_sregs()
    _load_segment(sregs.cs, state.code)
    for register in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _load_segment(register, state.data)
    _load_segment(sregs.tr, state.tss)
    _load_segment(sregs.ldt, state.ldt)
    sregs.gdt.base = state.gdt.base
    sregs.gdt.limit = state.gdt.limit
    sregs.idt.base = state.idt.base
    sregs.idt.limit = state.idt.limit
    sregs.cr0 = state.cr0
    sregs.cr3 = state.cr3
    sregs.cr4 = state.cr4
    sregs.efer = state.efer
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rdi", "rbp", "r8", "r9", "r10", "r11",
                 "r12", "r13", "r14", "r15"):
        setattr(regs, name, 0)
    regs.rip = state.rip
    regs.rsp = state.rsp
    regs.rbp = state.rsp
    regs.rsi = state.rsi
    regs.rflags = state.rflags
    vcpu.set_regs(regs)


def _load_segment(target: Any, segment: Segment) -> None:
    target.base = segment.base
    target.limit = segment.limit
    target.selector = segment.selector
    target.type = segment.type
    target.present = int(segment.present)
    target.dpl = segment.dpl
    target.db = int(segment.db)
    target.s = int(segment.s)
    target.l = int(segment.l)
    target.g = int(segment.g)
    target.avl = int(segment.avl)
    target.unusable = int(segment.unusable)


def _set_lvt_delivery_mode(lapic: bytearray, offset: int, mode: int, *,
                           masked: bool = False) -> None:
    value = int.from_bytes(lapic[offset:offset + 4], "little")
    value = (value & ~APIC_DELIVERY_MODE_MASK) | mode
    if masked:
        value |= APIC_LVT_MASKED
    lapic[offset:offset + 4] = value.to_bytes(4, "little")
