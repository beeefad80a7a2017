"""ioeventfd and irqfd: guest writes that signal an eventfd without an exit, and
eventfd writes that raise a guest interrupt."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from avmm.errors import KvmError
from avmm.kvm import Kvm, exits

from .guest import HANDLER_ADDRESS, UNMAPPED_MMIO_ADDRESS, install_idt, run

pytestmark = pytest.mark.kvm

UD2 = b"\x0f\x0b"


@pytest.fixture
def eventfd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def eventfd_count(fd: int) -> int:
    """Read (and reset) the counter without blocking: 0 if nothing was signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# -- ioeventfd -----------------------------------------------------------------------------

# mov ebx, 0xd0000000
# mov eax, 0x1234 ; mov [rbx], eax ; out 0x42, al
# mov eax, 0x5678 ; mov [rbx], eax ; out 0x43, al
# ud2
MMIO_WRITES = bytes.fromhex("bb000000d0 b834120000 8903 e642 b878560000 8903 e643") + UD2


def test_mmio_ioeventfd_with_datamatch(make_guest, eventfd):
    vm, vcpu, _ = make_guest(MMIO_WRITES)
    vm.ioeventfd(eventfd, UNMAPPED_MMIO_ADDRESS, 4, datamatch=0x1234)

    # the matching write signals the eventfd in the kernel: the next exit is the `out`
    assert run(vcpu) == exits.IoOut(0x42, 1, 1, b"\x34")
    assert eventfd_count(eventfd) == 1
    # any other value is an ordinary MMIO exit
    assert run(vcpu) == exits.MmioWrite(UNMAPPED_MMIO_ADDRESS, b"\x78\x56\x00\x00")
    assert run(vcpu) == exits.IoOut(0x43, 1, 1, b"\x78")
    assert eventfd_count(eventfd) == 0


def test_mmio_ioeventfd_without_datamatch_takes_every_value(make_guest, eventfd):
    vm, vcpu, _ = make_guest(MMIO_WRITES)
    vm.ioeventfd(eventfd, UNMAPPED_MMIO_ADDRESS, 4)

    assert run(vcpu) == exits.IoOut(0x42, 1, 1, b"\x34")
    assert run(vcpu) == exits.IoOut(0x43, 1, 1, b"\x78")
    assert eventfd_count(eventfd) == 2


def test_deassigned_ioeventfd_exits_again(make_guest, eventfd):
    vm, vcpu, _ = make_guest(MMIO_WRITES)
    vm.ioeventfd(eventfd, UNMAPPED_MMIO_ADDRESS, 4, datamatch=0x1234)
    vm.ioeventfd(eventfd, UNMAPPED_MMIO_ADDRESS, 4, datamatch=0x1234, deassign=True)

    assert run(vcpu) == exits.MmioWrite(UNMAPPED_MMIO_ADDRESS, b"\x34\x12\x00\x00")
    assert run(vcpu) == exits.IoOut(0x42, 1, 1, b"\x34")
    assert eventfd_count(eventfd) == 0


def test_pio_ioeventfd_with_datamatch(make_guest, eventfd):
    # mov dx, 0x600
    # mov ax, 0xbeef ; out dx, ax ; out 0x42, al
    # mov ax, 0x1111 ; out dx, ax ; out 0x43, al
    # ud2
    code = bytes.fromhex("66ba0006 66b8efbe 66ef e642 66b81111 66ef e643") + UD2
    vm, vcpu, _ = make_guest(code)
    vm.ioeventfd(eventfd, 0x600, 2, pio=True, datamatch=0xBEEF)

    assert run(vcpu) == exits.IoOut(0x42, 1, 1, b"\xef")
    assert eventfd_count(eventfd) == 1
    assert run(vcpu) == exits.IoOut(0x600, 2, 1, b"\x11\x11")
    assert run(vcpu) == exits.IoOut(0x43, 1, 1, b"\x11")
    assert eventfd_count(eventfd) == 0


def test_ioeventfd_on_the_same_place_twice_is_refused(make_guest, eventfd):
    vm, _, _ = make_guest(UD2)
    vm.ioeventfd(eventfd, 0x600, 2, pio=True, datamatch=1)
    with pytest.raises(KvmError) as caught:
        vm.ioeventfd(eventfd, 0x600, 2, pio=True, datamatch=1)
    assert (caught.value.ioctl, caught.value.errno) == ("KVM_IOEVENTFD", errno.EEXIST)


# -- irqfd ---------------------------------------------------------------------------------

GSI = 5
PIC_VECTOR_BASE = 0x30

# Program the in-kernel master PIC (vectors 0x30.., only IRQ 5 unmasked; the LAPIC's LINT0
# is ExtINT on the boot vCPU), enable interrupts, report ready, wait.
#   mov al, 0x11 ; out 0x20, al     ICW1: edge triggered, cascade, ICW4 follows
#   mov al, 0x30 ; out 0x21, al     ICW2: vector base
#   mov al, 0x04 ; out 0x21, al     ICW3: slave on IRQ 2
#   mov al, 0x01 ; out 0x21, al     ICW4: 8086 mode
#   mov al, 0xdf ; out 0x21, al     OCW1: mask all but IRQ 5
#   sti ; out 0x42, al ; jmp $
WAIT_FOR_IRQ5 = bytes.fromhex("b011e620 b030e621 b004e621 b001e621 b0dfe621 fb e642 ebfe")
# mov al, 0x35 ; out 0x44, al ; jmp $
IRQ5_HANDLER = bytes.fromhex("b035e644 ebfe")


def test_irqfd_assign_and_deassign(make_guest, eventfd):
    vm, _, _ = make_guest(UD2)
    vm.irqfd(eventfd, GSI)
    with pytest.raises(KvmError) as caught:
        vm.irqfd(eventfd, GSI)  # one eventfd drives at most one irqfd
    assert (caught.value.ioctl, caught.value.errno) == ("KVM_IRQFD", errno.EBUSY)
    vm.irqfd(eventfd, GSI, deassign=True)
    vm.irqfd(eventfd, GSI)  # free again


def test_irqfd_without_irqchip_is_refused(eventfd):
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            with pytest.raises(KvmError) as caught:
                vm.irqfd(eventfd, GSI)
        finally:
            vm.close()
    assert caught.value.ioctl == "KVM_IRQFD"


def _wait_for_interrupt(make_guest):
    guest = make_guest(WAIT_FOR_IRQ5, extra={HANDLER_ADDRESS: IRQ5_HANDLER})
    install_idt(guest, {PIC_VECTOR_BASE + GSI: HANDLER_ADDRESS})
    assert run(guest.vcpu) == exits.IoOut(0x42, 1, 1, b"\xdf")  # ready, IF set
    return guest


def test_irqfd_delivers_an_interrupt(make_guest, eventfd):
    vm, vcpu, _ = _wait_for_interrupt(make_guest)
    vm.irqfd(eventfd, GSI)
    os.eventfd_write(eventfd, 1)
    assert run(vcpu) == exits.IoOut(0x44, 1, 1, bytes([PIC_VECTOR_BASE + GSI]))


def test_irq_line_delivers_an_interrupt(make_guest):
    vm, vcpu, _ = _wait_for_interrupt(make_guest)
    vm.irq_line(GSI, 1)
    vm.irq_line(GSI, 0)
    assert run(vcpu) == exits.IoOut(0x44, 1, 1, bytes([PIC_VECTOR_BASE + GSI]))
