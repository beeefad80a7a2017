"""A KVM VM fd: memory slots, the in-kernel irqchip and PIT, irqfd, ioeventfd, and the
VM-wide state a snapshot saves (irqchip, PIT and kvmclock; see :mod:`avmm.state`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._ioctl import ioctl
from ._kvm_ffi import ffi, lib

if TYPE_CHECKING:
    from .system import Kvm
    from .vcpu import Vcpu


class Vm:
    """One KVM virtual machine. Made by :meth:`Kvm.create_vm`."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpu_mmap_size = kvm.vcpu_mmap_size()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, capability: str | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd: some answers are per VM (KVM_CAP_XSAVE2's
        size, KVM_CAP_NR_MEMSLOTS)."""
        number = getattr(lib, capability) if isinstance(capability, str) else capability
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", number)

    # -- memory --------------------------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, guest_address: int, size: int, host_address: int, *,
        log_dirty_pages: bool = False, read_only: bool = False,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION. A size of 0 deletes the slot."""
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = (lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty_pages else 0) | (
            lib.KVM_MEM_READONLY if read_only else 0
        )
        region.guest_phys_addr = guest_address
        region.memory_size = size
        region.userspace_addr = host_address
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def get_dirty_log(self, slot: int, pages: int) -> bytearray:
        """KVM_GET_DIRTY_LOG: the pages of memory slot ``slot`` (``pages`` long, logged
        with ``log_dirty_pages``) written since the last call, as a bitmap (bit ``p % 8``
        of byte ``p // 8`` is the slot's page ``p``); KVM clears its log as it answers."""
        if pages <= 0:
            raise ValueError(f"a memory slot of {pages} pages has no log")
        # KVM writes whole longs: the bitmap is rounded up to 64 pages.
        bitmap = bytearray((pages + 63) // 64 * 8)
        request = ffi.new("struct kvm_dirty_log *")
        request.slot = slot
        buffer = ffi.from_buffer(bitmap)
        request.dirty_bitmap = buffer
        ioctl(self.fd, "KVM_GET_DIRTY_LOG", request)
        return bitmap

    def set_tss_address(self, address: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space Intel VMX needs for
        real-mode emulation; must not overlap RAM or MMIO devices."""
        ioctl(self.fd, "KVM_SET_TSS_ADDR", address)

    def set_identity_map_address(self, address: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page, below the TSS pages by convention."""
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("uint64_t *", address))

    # -- interrupts ----------------------------------------------------------------------

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and per-vCPU LAPICs."""
        ioctl(self.fd, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, *, speaker_dummy: bool = True) -> None:
        """KVM_CREATE_PIT2: the in-kernel i8254 timer (and a dummy PC speaker port)."""
        config = ffi.new("struct kvm_pit_config *")
        config.flags = lib.KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0
        ioctl(self.fd, "KVM_CREATE_PIT2", config)

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: set GSI ``irq`` to ``level`` (0 or 1)."""
        line = ffi.new("struct kvm_irq_level *")
        line.irq = irq
        line.level = level
        ioctl(self.fd, "KVM_IRQ_LINE", line)

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        """KVM_IRQFD: a write to ``eventfd`` raises GSI ``gsi`` (edge) in the kernel."""
        request = ffi.new("struct kvm_irqfd *")
        request.fd = eventfd
        request.gsi = gsi
        request.flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        ioctl(self.fd, "KVM_IRQFD", request)

    def ioeventfd(
        self, eventfd: int, address: int, length: int, *, pio: bool = False,
        datamatch: int | None = None, deassign: bool = False,
    ) -> None:
        """KVM_IOEVENTFD: a guest write of ``length`` bytes at ``address`` (MMIO, or an I/O
        port with ``pio``), optionally only of value ``datamatch``, signals ``eventfd``
        without an exit to userspace."""
        request = ffi.new("struct kvm_ioeventfd *")
        request.addr = address
        request.len = length
        request.fd = eventfd
        flags = 0
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            request.datamatch = datamatch
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        request.flags = flags
        ioctl(self.fd, "KVM_IOEVENTFD", request)

    def get_irqchip(self, chip_id: int) -> Any:
        """KVM_GET_IRQCHIP: ``struct kvm_irqchip`` of ``chip_id`` (KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE or KVM_IRQCHIP_IOAPIC); read its part with
        :func:`irqchip_pic` or :func:`irqchip_ioapic`."""
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = chip_id
        ioctl(self.fd, "KVM_GET_IRQCHIP", chip)
        return chip

    def set_irqchip(self, chip: Any) -> None:
        ioctl(self.fd, "KVM_SET_IRQCHIP", chip)

    def get_pit2(self) -> Any:
        """KVM_GET_PIT2: ``struct kvm_pit_state2`` (three channels and flags)."""
        state = ffi.new("struct kvm_pit_state2 *")
        ioctl(self.fd, "KVM_GET_PIT2", state)
        return state

    def set_pit2(self, state: Any) -> None:
        ioctl(self.fd, "KVM_SET_PIT2", state)

    def get_clock(self) -> Any:
        """KVM_GET_CLOCK: ``struct kvm_clock_data``: the guest's kvmclock in ns, and
        ``flags`` saying which of ``realtime``/``host_tsc`` are valid and whether the
        clock is stable across vCPUs (KVM_CLOCK_TSC_STABLE)."""
        data = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, "KVM_GET_CLOCK", data)
        return data

    def set_clock(self, clock: int, *, flags: int = 0, realtime: int = 0) -> None:
        """KVM_SET_CLOCK: the guest's kvmclock reads ``clock`` ns from now. With
        ``flags=KVM_CLOCK_REALTIME`` KVM adds the host's CLOCK_REALTIME progress since
        ``realtime``; KVM_CLOCK_TSC_STABLE is an output only and is refused here."""
        if flags & ~lib.KVM_CLOCK_REALTIME:
            raise ValueError(f"KVM_SET_CLOCK takes only KVM_CLOCK_REALTIME, not flags {flags:#x}")
        data = ffi.new("struct kvm_clock_data *")
        data.clock = clock
        data.flags = flags
        data.realtime = realtime
        ioctl(self.fd, "KVM_SET_CLOCK", data)

    # -- vCPUs ---------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU, and map its ``kvm_run`` page."""
        from .vcpu import Vcpu

        return Vcpu(self, vcpu_id, ioctl(self.fd, "KVM_CREATE_VCPU", vcpu_id))


def irqchip_pic(chip: Any) -> Any:
    """The ``struct kvm_pic_state`` inside a PIC's ``struct kvm_irqchip``."""
    return lib.avmm_irqchip_pic(chip)


def irqchip_ioapic(chip: Any) -> Any:
    """The ``struct kvm_ioapic_state`` inside the IOAPIC's ``struct kvm_irqchip``."""
    return lib.avmm_irqchip_ioapic(chip)


def ioapic_redirection_table(ioapic: Any) -> Any:
    """The IOAPIC's redirection entries as a ``uint64_t *`` of KVM_IOAPIC_NUM_PINS."""
    return lib.avmm_ioapic_redirtbl(ioapic)
