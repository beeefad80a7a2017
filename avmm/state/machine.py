"""A whole KVM machine's state (the platform and every vCPU), saved and restored in the
order KVM needs across vCPUs.

This is the KVM part of a snapshot; devices, the config and guest memory travel next to
it (see :mod:`avmm.state.snapshot`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..kvm import Vcpu, Vm
from ._errors import SnapshotError
from .platform import VmPlatformState, restore_platform, save_platform
from .vcpu import VcpuState, restore_vcpu, save_vcpu, saved_msr_indices


@dataclass(frozen=True)
class MachineState:
    """The KVM state of a VM: its platform devices and each vCPU, in vCPU-id order."""

    STATE_VERSION: ClassVar[int] = 1

    platform: VmPlatformState
    vcpus: list[VcpuState]


def save_machine(vm: Vm, vcpus: Sequence[Vcpu]) -> MachineState:
    """Save ``vm`` and its ``vcpus``; no vCPU may be in KVM_RUN (the VM is paused).

    Every vCPU's pending I/O completes first, then the vCPUs are saved, then the
    platform: an interrupt an IOAPIC or PIC still holds is saved there, one a LAPIC
    accepted with its vCPU.
    """
    for vcpu in vcpus:
        vcpu.complete_pending_io()
    indices = saved_msr_indices(vm.kvm)
    states = [save_vcpu(vcpu, msr_indices=indices) for vcpu in vcpus]
    return MachineState(platform=save_platform(vm), vcpus=states)


def restore_machine(vm: Vm, vcpus: Sequence[Vcpu], state: MachineState, *,
                    catch_up_realtime: bool = False) -> None:
    """Load ``state`` into a freshly built ``vm`` with the same number of ``vcpus``
    (created, never run): the platform first, then each vCPU."""
    if len(vcpus) != len(state.vcpus):
        raise SnapshotError(f"the snapshot has {len(state.vcpus)} vCPUs; the VM being "
                            f"restored has {len(vcpus)}")
    restore_platform(vm, state.platform, catch_up_realtime=catch_up_realtime)
    for vcpu, vcpu_state in zip(vcpus, state.vcpus, strict=True):
        restore_vcpu(vcpu, vcpu_state)
