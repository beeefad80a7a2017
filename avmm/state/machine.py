"""A whole KVM machine's state (the platform and every vCPU), saved and restored in the
order KVM needs across vCPUs.

This is the KVM part of a snapshot; devices, the config and guest memory travel next to
it (see :mod:`avmm.state.snapshot`).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import KvmError
from ..kvm import Vcpu, Vm
from ._errors import StateCompatibilityError
from .platform import VmPlatformState, restore_platform, save_platform
from .vcpu import (
    VcpuState,
    check_vcpu_restorable,
    finish_pending_io,
    prepare_vcpu_restore,
    restore_vcpu,
    save_vcpu,
    saved_msr_indices,
)


@dataclass(frozen=True)
class MachineState:
    """The KVM state of a VM: its platform devices and each vCPU, in vCPU-id order."""

    STATE_VERSION: ClassVar[int] = 1

    platform: VmPlatformState
    vcpus: list[VcpuState]


def save_machine(vm: Vm, vcpus: Sequence[Vcpu], *, io_finished: bool = False) -> MachineState:
    """Save ``vm`` and its ``vcpus``; no vCPU may be in KVM_RUN (the VM is paused).

    Every vCPU's pending I/O completes first (unless ``io_finished``: see
    :func:`save_vcpu`), then the vCPUs are saved, then the platform: an interrupt an
    IOAPIC or PIC still holds is saved there, one a LAPIC accepted with its vCPU.
    """
    if not io_finished:
        for vcpu in vcpus:
            finish_pending_io(vcpu)
    indices = saved_msr_indices(vm.kvm)
    states = [save_vcpu(vcpu, msr_indices=indices, io_finished=True) for vcpu in vcpus]
    return MachineState(platform=save_platform(vm), vcpus=states)


def prepare_restore(vcpus: Sequence[Vcpu]) -> None:
    """Ask KVM now what :func:`check_machine_restorable` will need to know of ``vcpus``
    (created, never run): see :func:`avmm.state.vcpu.prepare_vcpu_restore`."""
    for vcpu in vcpus:
        prepare_vcpu_restore(vcpu)


def check_machine_restorable(vm: Vm, vcpus: Sequence[Vcpu], state: MachineState) -> list[str]:
    """Why ``state`` cannot be restored faithfully into ``vm`` and its ``vcpus`` (created,
    never run); empty when it can. See :func:`avmm.state.vcpu.check_vcpu_restorable`."""
    if len(vcpus) != len(state.vcpus):
        return [f"the snapshot has {len(state.vcpus)} vCPUs; the VM being restored has "
                f"{len(vcpus)}"]
    problems = []
    for vcpu, vcpu_state in zip(vcpus, state.vcpus, strict=True):
        problems += check_vcpu_restorable(vcpu, vcpu_state)
    if state.platform.pit is not None:
        try:
            vm.get_pit2()
        except KvmError as e:
            if e.errno != errno.ENXIO:
                raise
            problems.append("the snapshot's VM has a PIT; the VM being restored has none")
    return problems


def restore_machine(vm: Vm, vcpus: Sequence[Vcpu], state: MachineState, *,
                    catch_up_realtime: bool = False) -> None:
    """Load ``state`` into a freshly built ``vm`` with the same number of ``vcpus``
    (created, never run): first checks that this host can run it faithfully
    (:func:`check_machine_restorable`), then the platform, then each vCPU.

    :raises StateCompatibilityError: this host cannot (the first reason, and how many
        more there are); :class:`SnapshotError` for a state that does not fit.
    """
    problems = check_machine_restorable(vm, vcpus, state)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StateCompatibilityError(f"this host cannot restore the snapshot: "
                                      f"{problems[0]}{more}")
    restore_platform(vm, state.platform, catch_up_realtime=catch_up_realtime)
    for vcpu, vcpu_state in zip(vcpus, state.vcpus, strict=True):
        restore_vcpu(vcpu, vcpu_state)
