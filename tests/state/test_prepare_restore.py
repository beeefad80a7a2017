"""prepare_restore(): what the restore check asks KVM about a vCPU (the CPUID it
offers) is asked once, ahead of time, so that an incoming migration does not ask it
while the guest is paused; the check's answer is the same."""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from typing import Any

import pytest

from avmm.state import check_vcpu_restorable, prepare_restore
from avmm.state.vcpu import offered_cpuid, save_vcpu
from tests.kvm.guest import boot_guest

pytestmark = pytest.mark.kvm

UD2 = b"\x0f\x0b"


def test_a_prepared_vcpu_is_checked_without_asking_kvm_again(monkeypatch) -> None:
    with ExitStack() as cleanup:
        saved = save_vcpu(boot_guest(cleanup, UD2).vcpu)
        leaf7 = next(leaf for leaf in saved.cpuid if (leaf.function, leaf.index) == (7, 0))
        greedy = dataclasses.replace(saved, cpuid=[
            dataclasses.replace(leaf, ebx=0xFFFF_FFFF) if leaf is leaf7 else leaf
            for leaf in saved.cpuid])
        fresh = boot_guest(cleanup, UD2).vcpu
        expected = (offered_cpuid(fresh), check_vcpu_restorable(fresh, greedy),
                    check_vcpu_restorable(fresh, saved))
        assert expected[1] and not expected[2]  # both answers are compared below

        target = boot_guest(cleanup, UD2).vcpu
        prepare_restore([target])

        def asked(*args: Any) -> Any:
            raise AssertionError("KVM was asked for CPUID again")

        monkeypatch.setattr(target, "set_cpuid2", asked)
        monkeypatch.setattr(target, "get_cpuid2", asked)
        monkeypatch.setattr(type(target.vm.kvm), "supported_cpuid", asked)
        assert (offered_cpuid(target), check_vcpu_restorable(target, greedy),
                check_vcpu_restorable(target, saved)) == expected
