"""The VM-wide KVM state as plain data: the in-kernel irqchip (PIC master and slave,
IOAPIC), the PIT and the kvmclock. :func:`save_platform` and :func:`restore_platform`.

A restore loads this before any vCPU (the LAPICs restored next belong to the irqchip
that must already hold its state). The PIT's ``count_load_time`` is the host's
monotonic time of the last reload: KVM recomputes it when the state is set, so it is
kept only for the record.

The kvmclock is set back to the value it had when saved: the guest sees no time pass
while it was not running, as across a pause. (KVM_CLOCK_REALTIME would let it catch
up with wall-clock time instead; that is a choice for the caller, see
:func:`restore_platform`.)
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from ..errors import KvmError
from ..kvm import Vm
from ..kvm import structs as kvm_structs
from ..kvm.vm import ioapic_redirection_table, irqchip_ioapic, irqchip_pic
from ._cstruct import from_c, to_c
from ._errors import SnapshotError, StateCompatibilityError
from .codec import S64, U8, U16, U32, U64


@dataclass(frozen=True)
class PicState:
    """``struct kvm_pic_state``: one 8259A."""

    last_irr: U8
    irr: U8
    imr: U8
    isr: U8
    priority_add: U8
    irq_base: U8
    read_reg_select: U8
    poll: U8
    special_mask: U8
    init_state: U8
    auto_eoi: U8
    rotate_on_auto_eoi: U8
    special_fully_nested_mode: U8
    init4: U8
    elcr: U8
    elcr_mask: U8


@dataclass(frozen=True)
class IoapicState:
    """``struct kvm_ioapic_state``; ``redirtbl`` holds each pin's 64-bit entry."""

    base_address: U64
    ioregsel: U32
    id: U32
    irr: U32
    redirtbl: list[U64]


@dataclass(frozen=True)
class PitChannel:
    """``struct kvm_pit_channel_state``."""

    count: U32
    latched_count: U16
    count_latched: U8
    status_latched: U8
    status: U8
    read_state: U8
    write_state: U8
    write_latch: U8
    rw_mode: U8
    mode: U8
    bcd: U8
    gate: U8
    count_load_time: S64


@dataclass(frozen=True)
class PitState:
    """``struct kvm_pit_state2``."""

    channels: list[PitChannel]
    flags: U32


@dataclass(frozen=True)
class ClockState:
    """``struct kvm_clock_data`` as KVM_GET_CLOCK filled it: ``clock`` in ns;
    ``realtime`` and ``host_tsc`` are valid where ``flags`` says so."""

    clock: U64
    flags: U32
    realtime: U64
    host_tsc: U64


@dataclass(frozen=True)
class VmPlatformState:
    """The in-kernel devices of a VM. ``pit`` is None for a VM without a PIT."""

    STATE_VERSION: ClassVar[int] = 1

    pic_master: PicState
    pic_slave: PicState
    ioapic: IoapicState
    pit: PitState | None
    clock: ClockState


def save_platform(vm: Vm) -> VmPlatformState:
    """The irqchip, PIT and kvmclock state of ``vm`` (its vCPUs stopped)."""
    pic_master = from_c(PicState, irqchip_pic(vm.get_irqchip(kvm_structs.IRQCHIP_PIC_MASTER)))
    pic_slave = from_c(PicState, irqchip_pic(vm.get_irqchip(kvm_structs.IRQCHIP_PIC_SLAVE)))
    raw_ioapic = irqchip_ioapic(vm.get_irqchip(kvm_structs.IRQCHIP_IOAPIC))
    table = ioapic_redirection_table(raw_ioapic)
    ioapic = IoapicState(
        base_address=raw_ioapic.base_address, ioregsel=raw_ioapic.ioregsel,
        id=raw_ioapic.id, irr=raw_ioapic.irr,
        redirtbl=[int(table[i]) for i in range(kvm_structs.IOAPIC_NUM_PINS)],
    )
    try:
        pit: PitState | None = from_c(PitState, vm.get_pit2())
    except KvmError as e:
        if e.errno != errno.ENXIO:  # KVM's answer for a VM without a PIT
            raise
        pit = None
    clock = from_c(ClockState, vm.get_clock())
    return VmPlatformState(pic_master=pic_master, pic_slave=pic_slave, ioapic=ioapic,
                           pit=pit, clock=clock)


def restore_platform(vm: Vm, state: VmPlatformState, *, catch_up_realtime: bool = False) -> None:
    """Load ``state`` into ``vm``, which has its irqchip (and PIT, if the state has
    one) but whose vCPUs have not run. With ``catch_up_realtime`` (and a state saved
    with KVM_CLOCK_REALTIME) the kvmclock also advances by the wall-clock time since the
    save, as for a migration; by default it continues from the saved value."""
    with _step("PIC master"):
        chip = vm.get_irqchip(kvm_structs.IRQCHIP_PIC_MASTER)
        to_c(state.pic_master, irqchip_pic(chip), "pic_master")
        vm.set_irqchip(chip)
    with _step("PIC slave"):
        chip = vm.get_irqchip(kvm_structs.IRQCHIP_PIC_SLAVE)
        to_c(state.pic_slave, irqchip_pic(chip), "pic_slave")
        vm.set_irqchip(chip)
    with _step("IOAPIC"):
        chip = vm.get_irqchip(kvm_structs.IRQCHIP_IOAPIC)
        raw = irqchip_ioapic(chip)
        if len(state.ioapic.redirtbl) != kvm_structs.IOAPIC_NUM_PINS:
            raise SnapshotError(f"ioapic.redirtbl: has {len(state.ioapic.redirtbl)} pins; "
                                f"KVM's IOAPIC has {kvm_structs.IOAPIC_NUM_PINS}")
        raw.base_address = state.ioapic.base_address
        raw.ioregsel = state.ioapic.ioregsel
        raw.id = state.ioapic.id
        raw.irr = state.ioapic.irr
        table = ioapic_redirection_table(raw)
        for i, entry in enumerate(state.ioapic.redirtbl):
            table[i] = entry
        vm.set_irqchip(chip)
    if state.pit is not None:
        with _step("PIT"):
            pit = vm.get_pit2()
            to_c(state.pit, pit, "pit")
            vm.set_pit2(pit)
    with _step("kvmclock"):
        realtime = catch_up_realtime and bool(state.clock.flags & kvm_structs.CLOCK_REALTIME)
        vm.set_clock(state.clock.clock,
                     flags=kvm_structs.CLOCK_REALTIME if realtime else 0,
                     realtime=state.clock.realtime if realtime else 0)


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn KVM's refusal of one part of the platform state into one line."""
    try:
        yield
    except KvmError as e:
        raise StateCompatibilityError(f"KVM refused the saved {what} state: {e}") from e
    except (ValueError, OverflowError) as e:
        raise SnapshotError(f"the saved {what} state does not fit: {e}") from e
