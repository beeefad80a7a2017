"""CPUID filtering: topology, hypervisor bit, profiles and hidden features."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avmm.arch.x86.cpuid import (
    FEATURES,
    KVM_SIGNATURE,
    CpuidEntry,
    CpuidError,
    filter_cpuid,
    hypervisor_signature,
    resolve_hidden,
)

SIGNIFICANT = 1


def entry(function: int, index: int = 0, flags: int = 0, *regs: int) -> CpuidEntry:
    eax, ebx, ecx, edx = (*regs, 0, 0, 0, 0)[:4]
    return CpuidEntry(function, index, flags, eax, ebx, ecx, edx)


def kvm_like_supported() -> list[CpuidEntry]:
    """Shaped like KVM_GET_SUPPORTED_CPUID on a recent Intel host (values abridged)."""
    sig = [int.from_bytes(KVM_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8)]
    return [
        entry(0x0, 0, 0, 0x1F, 0x756E6547, 0x6C65746E, 0x49656E69),
        # leaf 1: host APIC id 7, 16 logical CPUs, HTT; ECX: sse3, cx16, x2apic, popcnt,
        # xsave, avx; no hypervisor bit.
        entry(0x1, 0, 0, 0x000806F8, 0x07100800, 0x1EB82201 | (1 << 28), 0x1FABFBFF),
        # leaf 4: L1d, L1i, L2 (shared by 2 threads), L3 (shared by 16), terminator.
        entry(0x4, 0, SIGNIFICANT, 0x1C004121, 0x02C0003F, 0x3F, 0),
        entry(0x4, 1, SIGNIFICANT, 0x1C004122, 0x01C0003F, 0x3F, 0),
        entry(0x4, 2, SIGNIFICANT, 0x1C004143, 0x03C0003F, 0x7FF, 0),
        entry(0x4, 3, SIGNIFICANT, 0x1C03C163, 0x0380003F, 0xBFFF, 0x4),
        entry(0x4, 4, SIGNIFICANT, 0, 0, 0, 0),
        entry(0x7, 0, SIGNIFICANT, 0, 0xF1BF07AB | (1 << 20) | (1 << 7), 0x1B4E, 0),
        # leaf 0xB from the host: 2 threads per core, 16 logical CPUs.
        entry(0xB, 0, SIGNIFICANT, 1, 2, 0x100, 7),
        entry(0xB, 1, SIGNIFICANT, 4, 16, 0x201, 7),
        entry(0xD, 0, SIGNIFICANT, 0x2E7, 0xA88, 0xA88, 0),
        entry(0xD, 1, SIGNIFICANT, 0xF, 0, 0, 0),
        entry(0x1F, 0, SIGNIFICANT, 1, 2, 0x100, 7),
        entry(0x1F, 1, SIGNIFICANT, 4, 16, 0x201, 7),
        entry(0x4000_0000, 0, 0, 0x4000_0001, *sig),
        entry(0x4000_0001, 0, 0, 0x01007AFB, 0, 0, 0),
        entry(0x8000_0000, 0, 0, 0x8000_0008, 0, 0, 0),
        entry(0x8000_0001, 0, 0, 0, 0, 0x121, 0x2C100800),
    ]


def find(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    matches = [e for e in entries if e.function == function and e.index == index]
    assert len(matches) == 1, f"leaf 0x{function:x}.{index}: {matches}"
    return matches[0]


@pytest.mark.parametrize(("vcpu_count", "core_bits"), [(1, 0), (2, 1)])
def test_topology(vcpu_count: int, core_bits: int) -> None:
    for vcpu_id in range(vcpu_count):
        entries = filter_cpuid(kvm_like_supported(), vcpu_id=vcpu_id, vcpu_count=vcpu_count)

        leaf1 = find(entries, 1)
        assert leaf1.ebx >> 24 == vcpu_id
        assert (leaf1.ebx >> 16) & 0xFF == vcpu_count
        assert leaf1.ebx & 0xFFFF == 0x0800  # CLFLUSH size and brand kept
        assert bool(leaf1.edx & (1 << 28)) == (vcpu_count > 1)
        assert leaf1.ecx & (1 << 31)

        for function in (0xB, 0x1F):
            smt, core, end = (find(entries, function, i) for i in range(3))
            assert (smt.eax & 0x1F, smt.ebx, smt.ecx) == (0, 1, 0x100)
            assert (core.eax & 0x1F, core.ebx, core.ecx) == (core_bits, vcpu_count, 0x201)
            assert (end.eax, end.ebx, end.ecx & 0xFF00) == (0, 0, 0)
            assert smt.edx == core.edx == end.edx == vcpu_id
            assert all(e.flags & SIGNIFICANT for e in (smt, core, end))

        for index in range(4):
            cache = find(entries, 4, index)
            assert cache.eax >> 26 == vcpu_count - 1
            level = (cache.eax >> 5) & 7
            sharing = (cache.eax >> 14) & 0xFFF
            assert sharing == (0 if level <= 2 else vcpu_count - 1)
            assert cache.eax & 0x3FFF == kvm_like_supported()[2 + index].eax & 0x3FFF
        assert find(entries, 4, 4).eax == 0


def test_order_and_other_leaves_kept() -> None:
    supported = kvm_like_supported()
    entries = filter_cpuid(supported, vcpu_id=0, vcpu_count=2)
    expected: list[tuple[int, int]] = []
    for e in supported:
        if e.function in (0xB, 0x1F):
            if e.index == 0:
                expected += [(e.function, 0), (e.function, 1), (e.function, 2)]
        else:
            expected.append((e.function, e.index))
    assert [(e.function, e.index) for e in entries] == expected
    for leaf in (0x0, 0x7, 0xD, 0x4000_0001, 0x8000_0001):
        assert find(entries, leaf) == find(supported, leaf)
    assert hypervisor_signature(entries) == KVM_SIGNATURE


def test_host_profile_keeps_features() -> None:
    entries = filter_cpuid(kvm_like_supported(), vcpu_id=0, vcpu_count=1, profile="host")
    assert find(entries, 1).ecx & (1 << 13)  # CX16
    assert find(entries, 1).ecx & (1 << 21)  # x2APIC


def test_compat_profile_hides_cx16_and_the_hypercall_pv_features() -> None:
    host = filter_cpuid(kvm_like_supported(), vcpu_id=0, vcpu_count=1, profile="host")
    compat = filter_cpuid(kvm_like_supported(), vcpu_id=0, vcpu_count=1, profile="compat")
    assert find(host, 1).ecx & ~find(compat, 1).ecx == 1 << 13
    # KVM's PV features: PV_UNHALT (7), PV_SEND_IPI (11), PV_SCHED_YIELD (13) go; the rest
    # (kvmclock, async PF, steal time, PV TLB flush, ...) stay.
    pv_host, pv_compat = find(host, 0x4000_0001).eax, find(compat, 0x4000_0001).eax
    assert pv_host & ~pv_compat == (1 << 7) | (1 << 11) | (1 << 13)
    assert pv_compat == pv_host & ~((1 << 7) | (1 << 11) | (1 << 13))
    assert [e for e in host if e.function not in (1, 0x4000_0001)] == [
        e for e in compat if e.function not in (1, 0x4000_0001)]


def test_hide_named_features() -> None:
    entries = filter_cpuid(
        kvm_like_supported(), vcpu_id=0, vcpu_count=1, hide=["smap", "popcnt", "xsave"]
    )
    leaf1, leaf7, leaf_d1 = find(entries, 1), find(entries, 7), find(entries, 0xD, 1)
    assert not leaf1.ecx & (1 << 23)  # popcnt
    assert not leaf1.ecx & (1 << 26)  # xsave
    assert not leaf1.ecx & (1 << 28)  # avx, because it needs xsave
    assert not leaf7.ebx & (1 << 5)  # avx2, because it needs avx
    assert not leaf7.ebx & (1 << 20)  # smap
    assert leaf7.ebx & (1 << 7)  # smep untouched
    assert leaf_d1.eax & 0xF == 0  # xsaveopt/xsavec/xsaves
    assert leaf1.ecx & (1 << 13)  # cx16 untouched


def test_resolve_hidden_closure() -> None:
    assert resolve_hidden("compat") == {"cx16", "kvm_pv_unhalt", "kvm_pv_send_ipi",
                                        "kvm_pv_sched_yield"}
    assert resolve_hidden("host", ["sse3"]) == {"sse3", "ssse3", "sse4_1", "sse4_2"}


def test_unknown_profile() -> None:
    with pytest.raises(CpuidError, match=r"unknown CPUID profile 'fast'; known profiles: "
                                         r"compat, host"):
        filter_cpuid(kvm_like_supported(), vcpu_id=0, vcpu_count=1, profile="fast")


def test_unknown_feature() -> None:
    with pytest.raises(CpuidError, match=r"unknown CPU feature 'cx8' in the hide list; "
                                         r"known features: .*cx16"):
        filter_cpuid(kvm_like_supported(), vcpu_id=0, vcpu_count=1, hide=["cx16", "cx8"])


@pytest.mark.parametrize(
    ("vcpu_id", "vcpu_count", "message"),
    [(0, 0, "vcpu_count 0 out of range"), (2, 2, "vcpu_id 2 out of range 0..1"),
     (0, 256, "vcpu_count 256")],
)
def test_bad_topology(vcpu_id: int, vcpu_count: int, message: str) -> None:
    with pytest.raises(CpuidError, match=message):
        filter_cpuid(kvm_like_supported(), vcpu_id=vcpu_id, vcpu_count=vcpu_count)


def test_missing_leaves_are_not_invented() -> None:
    supported = [e for e in kvm_like_supported() if e.function in (0, 1)]
    entries = filter_cpuid(supported, vcpu_id=0, vcpu_count=2, hide=["smap"])
    assert [e.function for e in entries] == [0, 1]
    assert hypervisor_signature(entries) is None


@given(st.integers(1, 255).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
def test_apic_ids_fit_the_topology(count_and_id: tuple[int, int]) -> None:
    vcpu_count, vcpu_id = count_and_id
    entries = filter_cpuid(kvm_like_supported(), vcpu_id=vcpu_id, vcpu_count=vcpu_count)
    core = find(entries, 0xB, 1)
    # The package ID (x2APIC ID >> shift) is 0 for every vCPU: one package.
    assert core.edx >> (core.eax & 0x1F) == 0
    assert find(entries, 1).ebx >> 24 == vcpu_id


def test_feature_table_is_consistent() -> None:
    for name, feature in FEATURES.items():
        assert name == name.lower()
        assert 0 <= feature.bit < 32
    positions = [(f.function, f.index, f.register, f.bit) for f in FEATURES.values()]
    assert len(set(positions)) == len(positions)
