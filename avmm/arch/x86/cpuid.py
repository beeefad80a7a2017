"""CPUID for a vCPU: what KVM supports, with the topology made true and features hidden.

:func:`filter_cpuid` is pure: it takes the entries KVM_GET_SUPPORTED_CPUID returned
(as :class:`CpuidEntry` values) and returns those to give one vCPU with KVM_SET_CPUID2.
It changes only:

* the topology, so the guest sees ``vcpu_count`` cores of one thread each in one package
  and this vCPU's APIC ID = ``vcpu_id`` (leaf 1 EBX, leaf 4 EAX, leaves 0xB and 0x1F);
* leaf 1 ECX bit 31, "running under a hypervisor" (KVM does not set it itself);
* the features the profile and the ``hide`` list remove.

The hypervisor leaves (0x4000_0000: "KVMKVMKVM\\0\\0\\0", 0x4000_0001: KVM's paravirtual
features) are passed through as KVM gave them, less the paravirtual features hidden by
name (``kvm_pv_*`` in :data:`FEATURES`). Vendor-specific AMD topology leaves
(0x8000_0008 ECX, 0x8000_001E) are passed through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Final, Literal

from ...errors import AvmmError
from ...kvm.system import CpuidEntry

#: KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the entry depends on ECX (the subleaf).
CPUID_FLAG_SIGNIFICANT_INDEX: Final = 1 << 0

HYPERVISOR_BASE_LEAF: Final = 0x4000_0000
KVM_SIGNATURE: Final = b"KVMKVMKVM\0\0\0"

Register = Literal["eax", "ebx", "ecx", "edx"]


class CpuidError(AvmmError):
    """A CPUID profile, feature name or topology request is invalid."""


@dataclass(frozen=True)
class Feature:
    """Where a feature flag lives: leaf ``function``, subleaf ``index``, a register bit."""

    function: int
    index: int
    register: Register
    bit: int


#: Features that can be hidden by name; names as in Linux's /proc/cpuinfo (and its
#: ``clearcpuid=``). Leaf 1 and leaf 7 subleaf 0 unless stated.
FEATURES: Final[dict[str, Feature]] = {
    "sse3": Feature(1, 0, "ecx", 0),
    "pclmulqdq": Feature(1, 0, "ecx", 1),
    "ssse3": Feature(1, 0, "ecx", 9),
    "fma": Feature(1, 0, "ecx", 12),
    "cx16": Feature(1, 0, "ecx", 13),
    "pcid": Feature(1, 0, "ecx", 17),
    "sse4_1": Feature(1, 0, "ecx", 19),
    "sse4_2": Feature(1, 0, "ecx", 20),
    "x2apic": Feature(1, 0, "ecx", 21),
    "movbe": Feature(1, 0, "ecx", 22),
    "popcnt": Feature(1, 0, "ecx", 23),
    "tsc_deadline_timer": Feature(1, 0, "ecx", 24),
    "aes": Feature(1, 0, "ecx", 25),
    "xsave": Feature(1, 0, "ecx", 26),
    "avx": Feature(1, 0, "ecx", 28),
    "f16c": Feature(1, 0, "ecx", 29),
    "rdrand": Feature(1, 0, "ecx", 30),
    "fsgsbase": Feature(7, 0, "ebx", 0),
    "bmi1": Feature(7, 0, "ebx", 3),
    "hle": Feature(7, 0, "ebx", 4),
    "avx2": Feature(7, 0, "ebx", 5),
    "smep": Feature(7, 0, "ebx", 7),
    "bmi2": Feature(7, 0, "ebx", 8),
    "erms": Feature(7, 0, "ebx", 9),
    "invpcid": Feature(7, 0, "ebx", 10),
    "rtm": Feature(7, 0, "ebx", 11),
    "avx512f": Feature(7, 0, "ebx", 16),
    "rdseed": Feature(7, 0, "ebx", 18),
    "adx": Feature(7, 0, "ebx", 19),
    "smap": Feature(7, 0, "ebx", 20),
    "clflushopt": Feature(7, 0, "ebx", 23),
    "umip": Feature(7, 0, "ecx", 2),
    "pku": Feature(7, 0, "ecx", 3),
    "la57": Feature(7, 0, "ecx", 16),
    "rdpid": Feature(7, 0, "ecx", 22),
    "xsaveopt": Feature(0xD, 1, "eax", 0),
    "xsavec": Feature(0xD, 1, "eax", 1),
    "xgetbv1": Feature(0xD, 1, "eax", 2),
    "xsaves": Feature(0xD, 1, "eax", 3),
    "lahf_lm": Feature(0x8000_0001, 0, "ecx", 0),
    "abm": Feature(0x8000_0001, 0, "ecx", 5),
    "pdpe1gb": Feature(0x8000_0001, 0, "edx", 26),
    "rdtscp": Feature(0x8000_0001, 0, "edx", 27),
    # KVM's paravirtual features (leaf 0x4000_0001 EAX), for the ones a guest uses through
    # hypercalls: PV_UNHALT (KVM_HC_KICK_CPU from PV spinlocks), PV_SEND_IPI
    # (KVM_HC_SEND_IPI), PV_SCHED_YIELD (KVM_HC_SCHED_YIELD).
    "kvm_pv_unhalt": Feature(HYPERVISOR_BASE_LEAF + 1, 0, "eax", 7),
    "kvm_pv_send_ipi": Feature(HYPERVISOR_BASE_LEAF + 1, 0, "eax", 11),
    "kvm_pv_sched_yield": Feature(HYPERVISOR_BASE_LEAF + 1, 0, "eax", 13),
}

#: Hiding a feature hides the ones that cannot work without it, so that the guest never
#: sees, say, AVX without the XSAVE it needs to enable AVX state.
FEATURE_DEPENDENTS: Final[dict[str, tuple[str, ...]]] = {
    "xsave": ("avx", "xsaveopt", "xsavec", "xgetbv1", "xsaves"),
    "avx": ("avx2", "fma", "f16c", "avx512f"),
    "sse3": ("ssse3",),
    "ssse3": ("sse4_1",),
    "sse4_1": ("sse4_2",),
}

#: What each profile hides on top of the topology fix-up.
PROFILES: Final[dict[str, tuple[str, ...]]] = {
    # Everything KVM supports.
    "host": (),
    # For KVMs whose instruction emulator cannot run ``lock cmpxchg16b`` in guest ring 0
    # (this workplace's paravirtual KVM reports an emulation failure). Linux uses it
    # whenever CX16 is set (e.g. SLUB's double-word cmpxchg), so hide CX16. Checked: KVM
    # honours this mask. Other problem instructions (popcnt, clac/stac, xrstor) cannot be
    # masked this way there because KVM does not list them as settable; use the guest
    # command line (clearcpuid=, noxsave) or emulate them instead.
    # That KVM also never returns from some hypercalls (seen: KVM_HC_SEND_IPI from an AP
    # during Linux's SMP bring-up, which hangs the boot), so the PV features that make
    # Linux issue hypercalls are hidden too; Linux then sends IPIs through the LAPIC.
    "compat": ("cx16", "kvm_pv_unhalt", "kvm_pv_send_ipi", "kvm_pv_sched_yield"),
}

_LEAF1_APIC_ID_SHIFT: Final = 24
_LEAF1_LOGICAL_COUNT_SHIFT: Final = 16
_LEAF1_EDX_HTT: Final = 1 << 28
_LEAF1_ECX_HYPERVISOR: Final = 1 << 31
_TOPOLOGY_LEVEL_SMT: Final = 1
_TOPOLOGY_LEVEL_CORE: Final = 2
#: Leaf 1 EBX[31:24] and EBX[23:16] are 8 bits wide.
MAX_VCPUS: Final = 255


def feature_names() -> list[str]:
    """The names :func:`filter_cpuid` accepts in ``hide``, sorted."""
    return sorted(FEATURES)


def resolve_hidden(profile: str, hide: Iterable[str] = ()) -> frozenset[str]:
    """All feature names hidden by ``profile`` plus ``hide``, dependents included.

    :raises CpuidError: unknown profile or feature name.
    """
    if profile not in PROFILES:
        raise CpuidError(
            f"unknown CPUID profile {profile!r}; known profiles: {', '.join(sorted(PROFILES))}"
        )
    requested = list(PROFILES[profile])
    for name in hide:
        if name not in FEATURES:
            raise CpuidError(
                f"unknown CPU feature {name!r} in the hide list; "
                f"known features: {', '.join(feature_names())}"
            )
        requested.append(name)
    hidden: set[str] = set()
    while requested:
        name = requested.pop()
        if name not in hidden:
            hidden.add(name)
            requested.extend(FEATURE_DEPENDENTS.get(name, ()))
    return frozenset(hidden)


def filter_cpuid(
    supported: Iterable[CpuidEntry],
    *,
    vcpu_id: int,
    vcpu_count: int,
    profile: str = "host",
    hide: Iterable[str] = (),
) -> list[CpuidEntry]:
    """The CPUID entries for vCPU ``vcpu_id`` of a VM with ``vcpu_count`` vCPUs.

    ``supported`` is what KVM_GET_SUPPORTED_CPUID returned; the result has the same
    leaves in the same order (leaves 0xB and 0x1F get exactly subleaves 0, 1 and the
    terminating 2). Topology: one package of ``vcpu_count`` cores with one thread each;
    the APIC ID (and x2APIC ID) of a vCPU is its ``vcpu_id``. ``profile`` is ``"host"``
    or ``"compat"`` (see :data:`PROFILES`); ``hide`` names further features to clear
    (see :data:`FEATURES`), together with the features that depend on them.

    Hiding only takes effect for bits KVM lets userspace clear; see :data:`PROFILES`.

    :raises CpuidError: unknown profile or feature, or an impossible topology.
    """
    if not 1 <= vcpu_count <= MAX_VCPUS:
        raise CpuidError(f"vcpu_count {vcpu_count} out of range 1..{MAX_VCPUS}")
    if not 0 <= vcpu_id < vcpu_count:
        raise CpuidError(f"vcpu_id {vcpu_id} out of range 0..{vcpu_count - 1}")
    hidden = resolve_hidden(profile, hide)

    result: list[CpuidEntry] = []
    topology_done: set[int] = set()
    for entry in supported:
        function = entry.function
        if function in (0xB, 0x1F):
            # Rebuild the whole leaf once, at the position of its first subleaf.
            if function not in topology_done:
                topology_done.add(function)
                result.extend(_topology_leaf(entry, vcpu_id=vcpu_id, vcpu_count=vcpu_count))
            continue
        if function == 1:
            entry = _leaf1(entry, vcpu_id=vcpu_id, vcpu_count=vcpu_count)
        elif function == 4:
            entry = _leaf4(entry, vcpu_count=vcpu_count)
        result.append(_hide(entry, hidden))
    return result


def hypervisor_signature(entries: Iterable[CpuidEntry]) -> bytes | None:
    """The 12-byte signature in leaf 0x4000_0000 (EBX, ECX, EDX), or None if absent."""
    for entry in entries:
        if entry.function == HYPERVISOR_BASE_LEAF:
            return b"".join(r.to_bytes(4, "little") for r in (entry.ebx, entry.ecx, entry.edx))
    return None


def _leaf1(entry: CpuidEntry, *, vcpu_id: int, vcpu_count: int) -> CpuidEntry:
    # EBX[31:24] initial APIC ID; EBX[23:16] addressable logical processors per package,
    # meaningful only with EDX.HTT, which says "more than one logical processor".
    ebx = entry.ebx & 0x0000_FFFF
    ebx |= vcpu_id << _LEAF1_APIC_ID_SHIFT
    ebx |= vcpu_count << _LEAF1_LOGICAL_COUNT_SHIFT
    edx = entry.edx | _LEAF1_EDX_HTT if vcpu_count > 1 else entry.edx & ~_LEAF1_EDX_HTT
    ecx = entry.ecx | _LEAF1_ECX_HYPERVISOR
    return replace(entry, ebx=ebx, ecx=ecx, edx=edx)


def _leaf4(entry: CpuidEntry, *, vcpu_count: int) -> CpuidEntry:
    # Deterministic cache parameters (Intel). EAX[4:0] = 0: no more caches.
    if entry.eax & 0x1F == 0:
        return entry
    level = (entry.eax >> 5) & 0x7
    # EAX[25:14]: logical processors sharing this cache - 1. With one thread per core,
    # L1 and L2 are private to a vCPU and the last-level cache is shared by the package.
    sharing = 0 if level <= 2 else vcpu_count - 1
    # EAX[31:26]: cores per package - 1 (6 bits).
    cores = min(vcpu_count, 64) - 1
    eax = entry.eax & 0x0000_3FFF
    eax |= min(sharing, 0xFFF) << 14
    eax |= cores << 26
    return replace(entry, eax=eax)


def _topology_leaf(first: CpuidEntry, *, vcpu_id: int, vcpu_count: int) -> list[CpuidEntry]:
    # Extended topology (0xB, and its successor 0x1F). Each subleaf describes a level:
    # EAX[4:0] = bits to shift the x2APIC ID right to get the next level's ID,
    # EBX[15:0] = logical processors at this level, ECX[15:8] = level type,
    # ECX[7:0] = subleaf, EDX = this vCPU's x2APIC ID. Subleaf 2 (type 0) ends the list.
    core_bits = (vcpu_count - 1).bit_length()
    flags = first.flags | CPUID_FLAG_SIGNIFICANT_INDEX

    def level(index: int, shift: int, count: int, level_type: int) -> CpuidEntry:
        return CpuidEntry(
            function=first.function,
            index=index,
            flags=flags,
            eax=shift,
            ebx=count,
            ecx=(level_type << 8) | index,
            edx=vcpu_id,
        )

    return [
        level(0, 0, 1, _TOPOLOGY_LEVEL_SMT),
        level(1, core_bits, vcpu_count, _TOPOLOGY_LEVEL_CORE),
        level(2, 0, 0, 0),
    ]


def _hide(entry: CpuidEntry, hidden: frozenset[str]) -> CpuidEntry:
    for name in hidden:
        feature = FEATURES[name]
        if feature.function != entry.function or feature.index != entry.index:
            continue
        value = getattr(entry, feature.register) & ~(1 << feature.bit)
        entry = replace(entry, **{feature.register: value})
    return entry
