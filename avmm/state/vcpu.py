"""A vCPU's whole KVM state as plain data: :class:`VcpuState`, :func:`save_vcpu` and
:func:`restore_vcpu`.

The dataclasses mirror ``<linux/kvm.h>`` (same member names), hold only ints, bytes and
lists, and are encoded by :mod:`avmm.state.codec`. XSAVE and the LAPIC page are kept as
the kernel's bytes: their layout is the hardware's (XSAVE) or KVM's ABI (LAPIC).

Order matters to KVM, on both sides (Firecracker documents the same rules):

* save: MP state first (KVM_GET_MP_STATE accepts pending INIT/SIPI and may change the
  LAPIC); the vCPU events last (other getters can change what is pending). Before any
  of it, an I/O or MMIO exit userspace already answered is completed
  (:meth:`avmm.kvm.Vcpu.complete_pending_io`): KVM keeps that half-done instruction
  nowhere userspace can read.
* restore: CPUID first (which MSRs exist depends on it), the TSC frequency before the
  TSC MSR, MP state, regs before events (KVM_SET_REGS clears a pending exception),
  sregs before the LAPIC (sregs carry the APIC base), the LAPIC before the MSRs (the
  TSC-deadline MSR only takes when the LAPIC timer is in deadline mode), events last.

Everything here runs on a vCPU that no thread is running (the VM is paused).
"""

from __future__ import annotations

import errno
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import structlog

from ..errors import KvmError
from ..kvm import CpuidEntry, Kvm, Vcpu
from ..kvm import structs as kvm_structs
from ._cstruct import from_c, to_c
from ._errors import SnapshotError, StateCompatibilityError
from .codec import U8, U16, U32, U64

log = structlog.get_logger(__name__)

# -- MSRs ------------------------------------------------------------------------------

MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_TSC_ADJUST = 0x3B
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_CR_PAT = 0x277
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_EFER = 0xC000_0080
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102
MSR_TSC_AUX = 0xC000_0103
MSR_KVM_WALL_CLOCK = 0x11
MSR_KVM_SYSTEM_TIME = 0x12
MSR_KVM_WALL_CLOCK_NEW = 0x4B56_4D00
MSR_KVM_SYSTEM_TIME_NEW = 0x4B56_4D01

#: MSRs saved besides KVM_GET_MSR_INDEX_LIST's: some KVMs leave these out of the list
#: although a guest depends on them (the MTRRs avmm programs at boot, EFER and the APIC
#: base, which sregs also carry, TSC_AUX for RDTSCP). Those this KVM cannot read are
#: dropped and recorded in :attr:`VcpuState.msrs_refused`.
EXTRA_MSRS: tuple[int, ...] = (
    MSR_IA32_TSC, MSR_IA32_APICBASE, MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR,
    MSR_SYSCALL_MASK, MSR_KERNEL_GS_BASE, MSR_TSC_AUX, MSR_IA32_MISC_ENABLE,
    MSR_IA32_CR_PAT, MSR_IA32_TSC_ADJUST, MSR_IA32_TSC_DEADLINE,
    MSR_KVM_WALL_CLOCK_NEW, MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_WALL_CLOCK, MSR_KVM_SYSTEM_TIME,
    MSR_MTRR_DEF_TYPE,
    0x250, 0x258, 0x259, *range(0x268, 0x270),   # fixed-range MTRRs
    *range(0x200, 0x210),                        # variable-range MTRRs (8 base/mask pairs)
)


def saved_msr_indices(kvm: Kvm) -> list[int]:
    """The MSRs a snapshot asks KVM for: KVM_GET_MSR_INDEX_LIST in KVM's order (it lists
    the TSC before the MSRs that depend on it, such as TSC_DEADLINE), then
    :data:`EXTRA_MSRS` not already in it."""
    indices = list(dict.fromkeys(kvm.msr_index_list()))
    known = set(indices)
    indices += [index for index in EXTRA_MSRS if index not in known]
    return indices

# -- the state ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Regs:
    """``struct kvm_regs``."""

    rax: U64
    rbx: U64
    rcx: U64
    rdx: U64
    rsi: U64
    rdi: U64
    rsp: U64
    rbp: U64
    r8: U64
    r9: U64
    r10: U64
    r11: U64
    r12: U64
    r13: U64
    r14: U64
    r15: U64
    rip: U64
    rflags: U64


@dataclass(frozen=True)
class Segment:
    """``struct kvm_segment``."""

    base: U64
    limit: U32
    selector: U16
    type: U8
    present: U8
    dpl: U8
    db: U8
    s: U8
    l: U8  # noqa: E741 (KVM's name)
    g: U8
    avl: U8
    unusable: U8


@dataclass(frozen=True)
class DescriptorTable:
    """``struct kvm_dtable``."""

    base: U64
    limit: U16


@dataclass(frozen=True)
class Sregs:
    """``struct kvm_sregs``."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: U64
    cr2: U64
    cr3: U64
    cr4: U64
    cr8: U64
    efer: U64
    apic_base: U64
    interrupt_bitmap: list[U64]


@dataclass(frozen=True)
class Xcr:
    """``struct kvm_xcr``: one extended control register (XCR0 is the XSAVE mask)."""

    xcr: U32
    value: U64


@dataclass(frozen=True)
class Xcrs:
    """``struct kvm_xcrs``, its ``nr_xcrs`` entries as a list."""

    flags: U32
    xcrs: list[Xcr]


@dataclass(frozen=True)
class DebugRegs:
    """``struct kvm_debugregs``."""

    db: list[U64]
    dr6: U64
    dr7: U64
    flags: U64


@dataclass(frozen=True)
class EventException:
    injected: U8
    nr: U8
    has_error_code: U8
    pending: U8
    error_code: U32


@dataclass(frozen=True)
class EventInterrupt:
    injected: U8
    nr: U8
    soft: U8
    shadow: U8


@dataclass(frozen=True)
class EventNmi:
    injected: U8
    pending: U8
    masked: U8
    pad: U8


@dataclass(frozen=True)
class EventSmi:
    smm: U8
    pending: U8
    smm_inside_nmi: U8
    latched_init: U8


@dataclass(frozen=True)
class EventTripleFault:
    pending: U8


@dataclass(frozen=True)
class VcpuEvents:
    """``struct kvm_vcpu_events``: what is pending or being injected."""

    exception: EventException
    interrupt: EventInterrupt
    nmi: EventNmi
    sipi_vector: U32
    flags: U32
    smi: EventSmi
    triple_fault: EventTripleFault
    exception_has_payload: U8
    exception_payload: U64


@dataclass(frozen=True)
class Msr:
    index: U32
    value: U64


@dataclass(frozen=True)
class CpuidLeaf:
    """``struct kvm_cpuid_entry2``."""

    function: U32
    index: U32
    flags: U32
    eax: U32
    ebx: U32
    ecx: U32
    edx: U32

    def entry(self) -> CpuidEntry:
        return CpuidEntry(self.function, self.index, self.flags, self.eax, self.ebx,
                          self.ecx, self.edx)


@dataclass(frozen=True)
class VcpuState:
    """Everything KVM holds for one vCPU. ``xsave`` is the XSAVE area (KVM_GET_XSAVE2's
    size, or 4 KiB); ``fpu`` the ``struct kvm_fpu`` bytes of a host without XSAVE (then
    ``xsave`` and ``xcrs`` are None). ``msrs`` are in the order they are written back;
    ``msrs_refused`` lists the MSRs asked for that KVM would not read on the saving host
    (recorded, not silently dropped). ``tsc_khz`` is None where KVM cannot tell it."""

    STATE_VERSION: ClassVar[int] = 1

    vcpu_id: U32
    mp_state: U32
    regs: Regs
    sregs: Sregs
    xsave: bytes | None
    fpu: bytes | None
    xcrs: Xcrs | None
    debugregs: DebugRegs
    lapic: bytes
    tsc_khz: U32 | None
    cpuid: list[CpuidLeaf]
    msrs: list[Msr]
    msrs_refused: list[U32]
    events: VcpuEvents

    def msr(self, index: int) -> int | None:
        """The saved value of MSR ``index``, or None if it was not saved."""
        for entry in self.msrs:
            if entry.index == index:
                return entry.value
        return None

# -- save --------------------------------------------------------------------------------


def finish_pending_io(vcpu: Vcpu) -> None:
    """Finish the access of ``vcpu``'s last exit (see the module doc), for a vCPU no
    loop runs. A further exit made meanwhile cannot be served here (no buses): refuse to
    save a state that would lose it. A paused VM's vCPU loop finishes on its own thread
    before it parks and serves such exits (:class:`avmm.vcpu_loop.VcpuLoop`)."""
    leftover = vcpu.complete_pending_io()
    if leftover is not None:
        raise SnapshotError(f"vcpu {vcpu.id} made another access ({leftover!r}) while KVM "
                            "finished its last one; pause the VM before saving it")


def save_vcpu(vcpu: Vcpu, *, msr_indices: Sequence[int] | None = None,
              io_finished: bool = False) -> VcpuState:
    """The state of ``vcpu``, which no thread may be running (KVM_RUN). ``msr_indices``
    defaults to :func:`saved_msr_indices`. ``io_finished``: the thread that ran the vCPU
    has finished its last access (a paused VM's vCPU loop does), so no KVM_RUN is needed
    here: on kvm_pvm even one with ``immediate_exit`` set can run the guest on."""
    if not io_finished:
        finish_pending_io(vcpu)
    mp_state = vcpu.get_mp_state()  # first: it may change the LAPIC (see the module doc)
    regs = from_c(Regs, vcpu.get_regs())
    sregs = from_c(Sregs, vcpu.get_sregs())
    xsave, fpu = _save_fpu(vcpu)
    xcrs = _save_xcrs(vcpu) if xsave is not None else None
    debugregs = from_c(DebugRegs, vcpu.get_debugregs())
    lapic = bytes(vcpu.get_lapic())
    tsc_khz = _save_tsc_khz(vcpu)
    cpuid = [CpuidLeaf(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
             for e in vcpu.get_cpuid2()]
    indices = list(msr_indices) if msr_indices is not None else saved_msr_indices(vcpu.vm.kvm)
    msrs, refused = _save_msrs(vcpu, indices)
    events = from_c(VcpuEvents, vcpu.get_vcpu_events())  # last
    if refused:
        log.info("MSRs KVM would not read are left out of the vCPU state", vcpu=vcpu.id,
                 msrs=[f"{index:#x}" for index in refused])
    return VcpuState(vcpu_id=vcpu.id, mp_state=mp_state, regs=regs, sregs=sregs,
                     xsave=xsave, fpu=fpu, xcrs=xcrs, debugregs=debugregs, lapic=lapic,
                     tsc_khz=tsc_khz, cpuid=cpuid, msrs=msrs, msrs_refused=refused,
                     events=events)


def _save_fpu(vcpu: Vcpu) -> tuple[bytes | None, bytes | None]:
    size = vcpu.vm.check_extension("KVM_CAP_XSAVE2")
    if size:
        return vcpu.get_xsave2(size), None
    if vcpu.vm.check_extension("KVM_CAP_XSAVE"):
        return vcpu.get_xsave(), None
    return None, kvm_structs.struct_bytes(vcpu.get_fpu())


def _save_xcrs(vcpu: Vcpu) -> Xcrs | None:
    if not vcpu.vm.check_extension("KVM_CAP_XCRS"):
        return None
    raw = vcpu.get_xcrs()
    count = min(raw.nr_xcrs, len(raw.xcrs))
    return Xcrs(flags=raw.flags,
                xcrs=[Xcr(raw.xcrs[i].xcr, raw.xcrs[i].value) for i in range(count)])


def _save_tsc_khz(vcpu: Vcpu) -> int | None:
    if not vcpu.vm.check_extension("KVM_CAP_GET_TSC_KHZ"):
        return None
    return vcpu.get_tsc_khz() or None


def _save_msrs(vcpu: Vcpu, indices: list[int]) -> tuple[list[Msr], list[int]]:
    """Read every MSR of ``indices`` KVM will give; KVM stops a batch at the first one
    it refuses, so skip that one and go on with the rest."""
    values: list[Msr] = []
    refused: list[int] = []
    remaining = indices
    while remaining:
        got = vcpu.read_msrs(remaining)
        values += [Msr(index, value) for index, value in got.items()]
        if len(got) == len(remaining):
            break
        refused.append(remaining[len(got)])
        remaining = remaining[len(got) + 1:]
    return values, refused

# -- restore -----------------------------------------------------------------------------


@contextmanager
def _step(vcpu: Vcpu, what: str) -> Iterator[None]:
    """Turn KVM's refusal of one part of the state into one line naming that part."""
    try:
        yield
    except KvmError as e:
        raise StateCompatibilityError(f"vcpu {vcpu.id}: KVM refused the saved {what}: {e}") \
            from e
    except ValueError as e:
        raise SnapshotError(f"vcpu {vcpu.id}: the saved {what} does not fit: {e}") from e


def restore_vcpu(vcpu: Vcpu, state: VcpuState) -> None:
    """Load ``state`` into ``vcpu`` (freshly created, not running), in KVM's order.

    :raises SnapshotError: the state is for another vCPU or does not fit KVM's structs;
        :class:`StateCompatibilityError` when KVM refuses a part (named in the message).
    """
    if state.vcpu_id != vcpu.id:
        raise SnapshotError(f"the state of vcpu {state.vcpu_id} cannot be restored into "
                            f"vcpu {vcpu.id}")
    with _step(vcpu, "CPUID"):
        vcpu.set_cpuid2([leaf.entry() for leaf in state.cpuid])
    if state.tsc_khz is not None:
        with _step(vcpu, f"TSC frequency ({state.tsc_khz} kHz)"):
            _restore_tsc_khz(vcpu, state.tsc_khz)
    with _step(vcpu, "MP state"):
        vcpu.set_mp_state(state.mp_state)
    with _step(vcpu, "registers"):
        regs = vcpu.get_regs()
        to_c(state.regs, regs, "regs")
        vcpu.set_regs(regs)
    with _step(vcpu, "segment and control registers"):
        sregs = vcpu.get_sregs()
        to_c(state.sregs, sregs, "sregs")
        vcpu.set_sregs(sregs)
    if state.xsave is not None:
        with _step(vcpu, "XSAVE area"):
            if not vcpu.vm.check_extension("KVM_CAP_XSAVE"):
                raise KvmError("KVM_SET_XSAVE", errno.ENOTSUP, "this KVM has no KVM_CAP_XSAVE")
            vcpu.set_xsave(state.xsave)
    elif state.fpu is not None:
        with _step(vcpu, "FPU state"):
            fpu = vcpu.get_fpu()
            kvm_structs.load_struct_bytes(fpu, state.fpu)
            vcpu.set_fpu(fpu)
    else:
        raise SnapshotError(f"vcpu {vcpu.id}: the state has neither an XSAVE area nor FPU state")
    if state.xcrs is not None:
        with _step(vcpu, "XCRs"):
            _restore_xcrs(vcpu, state.xcrs)
    with _step(vcpu, "debug registers"):
        debugregs = vcpu.get_debugregs()
        to_c(state.debugregs, debugregs, "debugregs")
        vcpu.set_debugregs(debugregs)
    with _step(vcpu, "LAPIC"):
        if len(state.lapic) != kvm_structs.LAPIC_SIZE:
            raise ValueError(f"{len(state.lapic)} bytes, KVM's LAPIC page has "
                             f"{kvm_structs.LAPIC_SIZE}")
        vcpu.set_lapic(state.lapic)
    with _step(vcpu, "MSRs"):
        vcpu.set_msrs({entry.index: entry.value for entry in state.msrs})
    with _step(vcpu, "events"):
        events = vcpu.get_vcpu_events()
        to_c(state.events, events, "events")
        # KVM_GET_VCPU_EVENTS always fills sipi_vector but does not flag it valid; an AP
        # between INIT and SIPI needs it back.
        events.flags = state.events.flags | kvm_structs.VCPUEVENT_VALID_SIPI_VECTOR
        vcpu.set_vcpu_events(events)


def _restore_tsc_khz(vcpu: Vcpu, khz: int) -> None:
    if not vcpu.vm.check_extension("KVM_CAP_GET_TSC_KHZ"):
        raise KvmError("KVM_GET_TSC_KHZ", errno.ENOTSUP, "this KVM cannot tell the TSC rate")
    if tsc_rates_match(vcpu.get_tsc_khz(), khz):
        return
    vcpu.set_tsc_khz(khz)


def _restore_xcrs(vcpu: Vcpu, state: Xcrs) -> None:
    raw = vcpu.get_xcrs()
    if len(state.xcrs) > len(raw.xcrs):
        raise ValueError(f"{len(state.xcrs)} XCRs, KVM takes at most {len(raw.xcrs)}")
    raw.nr_xcrs = len(state.xcrs)
    raw.flags = state.flags
    for i, xcr in enumerate(state.xcrs):
        raw.xcrs[i].xcr = xcr.xcr
        raw.xcrs[i].value = xcr.value
    vcpu.set_xcrs(raw)

# -- compatibility -------------------------------------------------------------------------

#: KVM's own tolerance for a TSC rate it does not scale (kvm.tsc_tolerance_ppm).
TSC_TOLERANCE_PPM = 250

#: CPUID feature registers a restored guest may rely on: (leaf, subleaf, register).
FEATURE_REGISTERS: tuple[tuple[int, int, str], ...] = (
    (0x1, 0, "ecx"), (0x1, 0, "edx"),
    (0x7, 0, "ebx"), (0x7, 0, "ecx"), (0x7, 0, "edx"),
    (0xD, 1, "eax"),
    (0x8000_0001, 0, "ecx"), (0x8000_0001, 0, "edx"),
)
#: Bits KVM computes per vCPU or per moment rather than offers: OSXSAVE (leaf 1 ECX
#: bit 27, mirrors CR4) and the APIC flag (leaf 1 EDX bit 9, mirrors the APIC base).
_DYNAMIC_BITS = {(0x1, 0, "ecx"): 1 << 27, (0x1, 0, "edx"): 1 << 9,
                 (0x7, 0, "ecx"): 1 << 4}  # OSPKE mirrors CR4.PKE


def tsc_rates_match(host_khz: int, guest_khz: int) -> bool:
    return abs(host_khz - guest_khz) * 1_000_000 <= TSC_TOLERANCE_PPM * guest_khz


def cpuid_problems(saved: Sequence[CpuidLeaf], supported: Sequence[CpuidEntry]) -> list[str]:
    """Feature bits the saved guest saw that this host's KVM does not offer: a guest
    that used one would fault after the restore. Empty when the host can run it."""
    offered = {(e.function, e.index): e for e in supported}
    problems = []
    for leaf, subleaf, register in FEATURE_REGISTERS:
        guest = next((entry for entry in saved
                      if entry.function == leaf and entry.index == subleaf), None)
        if guest is None:
            continue
        host = offered.get((leaf, subleaf))
        host_bits = getattr(host, register) if host is not None else 0
        missing = getattr(guest, register) & ~host_bits & ~_DYNAMIC_BITS.get(
            (leaf, subleaf, register), 0)
        if missing:
            bits = ", ".join(str(bit) for bit in range(32) if missing >> bit & 1)
            problems.append(f"CPUID leaf {leaf:#x}.{subleaf} {register.upper()} bits {bits}")
    return problems


#: :func:`offered_cpuid` of the vCPUs :func:`prepare_vcpu_restore` was called for.
_OFFERED: weakref.WeakKeyDictionary[Vcpu, list[CpuidEntry]] = weakref.WeakKeyDictionary()


def prepare_vcpu_restore(vcpu: Vcpu) -> None:
    """Find out now what :func:`check_vcpu_restorable` asks KVM about ``vcpu`` (created,
    never run): three ioctls, about a millisecond a vCPU, which an incoming migration
    would otherwise spend while the guest is paused. What a vCPU is offered does not
    change over its life; its CPUID is set again by the restore."""
    _OFFERED[vcpu] = _offered_cpuid(vcpu)


def offered_cpuid(vcpu: Vcpu) -> list[CpuidEntry]:
    """What a guest on this host may see: KVM_GET_SUPPORTED_CPUID, and what ``vcpu``
    reports once given all of it (some KVMs, such as kvm_pvm, pass through host bits
    they do not list as supported). Call it on a vCPU that has not run yet: it gives the
    vCPU that CPUID (a restore then gives it the saved one). Found before by
    :func:`prepare_vcpu_restore`, if that was called for ``vcpu``."""
    known = _OFFERED.get(vcpu)
    if known is not None:
        return list(known)
    return _offered_cpuid(vcpu)


def _offered_cpuid(vcpu: Vcpu) -> list[CpuidEntry]:
    supported = vcpu.vm.kvm.supported_cpuid()
    vcpu.set_cpuid2(supported)
    reported = {(e.function, e.index): e for e in vcpu.get_cpuid2()}
    offered = []
    for entry in supported:
        seen = reported.get((entry.function, entry.index), entry)
        offered.append(CpuidEntry(entry.function, entry.index, entry.flags,
                                  entry.eax | seen.eax, entry.ebx | seen.ebx,
                                  entry.ecx | seen.ecx, entry.edx | seen.edx))
    return offered


def check_vcpu_restorable(vcpu: Vcpu, state: VcpuState) -> list[str]:
    """Why this host cannot restore ``state`` faithfully into ``vcpu`` (created, never
    run); empty when it can. Looks at the CPUID features the guest saw, the TSC rate
    (a different one needs KVM_CAP_TSC_CONTROL) and the XSAVE area's size."""
    vm = vcpu.vm
    problems = [f"vcpu {state.vcpu_id}: the guest used {what}, which this host's KVM "
                "does not offer" for what in cpuid_problems(state.cpuid, offered_cpuid(vcpu))]
    host_khz = vcpu.get_tsc_khz() if vm.check_extension("KVM_CAP_GET_TSC_KHZ") else None
    can_scale = bool(vm.kvm.check_extension("KVM_CAP_TSC_CONTROL"))
    if state.tsc_khz is not None and host_khz is not None \
            and not tsc_rates_match(host_khz, state.tsc_khz) and not can_scale:
        problems.append(f"vcpu {state.vcpu_id}: the guest's TSC ran at {state.tsc_khz} kHz, "
                        f"this host's at {host_khz} kHz, and KVM cannot scale it "
                        "(no KVM_CAP_TSC_CONTROL)")
    xsave_size = max(vm.check_extension("KVM_CAP_XSAVE2"), kvm_structs.XSAVE_LEGACY_SIZE) \
        if vm.check_extension("KVM_CAP_XSAVE") else 0
    if state.xsave is not None and len(state.xsave) > xsave_size:
        problems.append(f"vcpu {state.vcpu_id}: the guest's XSAVE area is "
                        f"{len(state.xsave)} bytes, this host's KVM takes {xsave_size}")
    return problems


__all__ = [
    "CpuidLeaf", "DebugRegs", "DescriptorTable", "Msr", "Regs", "Segment", "Sregs",
    "VcpuEvents", "VcpuState", "Xcr", "Xcrs", "check_vcpu_restorable", "offered_cpuid",
    "prepare_vcpu_restore", "restore_vcpu", "save_vcpu", "saved_msr_indices",
]
