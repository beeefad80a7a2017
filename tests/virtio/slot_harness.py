"""A :class:`~avmm.vm_virtio.VirtioMmioSlot` without KVM, and a driver that works its
registers, for tests of the slot, the transport and the vhost-user front-end.

:class:`FakeVm` takes the irqfd and ioeventfd registrations and does nothing with them:
the test plays KVM itself (it writes a queue's kick eventfd where the guest's QueueNotify
write would, and reads the irqfd to see interrupts). :class:`Driver` plays the guest's
driver through ``transport.read``/``write``; its methods block (a reset waits for the
device to stop), so async tests call them with ``trio.to_thread.run_sync``, as a vCPU
thread would.
"""

from __future__ import annotations

import os

import trio

from avmm.memory import MemoryAccess
from avmm.virtio.device import VIRTIO_F_VERSION_1, VirtioDevice
from avmm.virtio.mmio import DeviceStatus, MmioTransport, Register
from avmm.vm_virtio import Placement, VirtioMmioSlot

#: Ring layout: queue i's descriptor table, available and used rings at RING_BASE +
#: i * RING_STRIDE (+0, +0x1000, +0x2000): room for 256 entries each.
RING_BASE = 0x10000
RING_STRIDE = 0x4000
OK_STATUS = int(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
                | DeviceStatus.DRIVER_OK)


class FakeVm:
    """Takes what a slot registers with KVM; nothing is wired."""

    def irqfd(self, fd: int, gsi: int) -> None:
        pass

    def ioeventfd(self, fd: int, address: int, length: int, *, datamatch: int) -> None:
        pass


def make_slot(device: VirtioDevice, memory: MemoryAccess) -> VirtioMmioSlot:
    """A slot for ``device`` (call from the trio thread; attach it to a nursery)."""
    return VirtioMmioSlot(vm=FakeVm(), memory=memory, device=device,  # type: ignore[arg-type]
                          placement=Placement(0xD000_0000, 5),
                          token=trio.lowlevel.current_trio_token())


class Driver:
    """The guest's driver, register by register (blocking calls: use a thread)."""

    def __init__(self, transport: MmioTransport) -> None:
        self.transport = transport

    def read(self, register: Register) -> int:
        return int.from_bytes(self.transport.read(int(register), 4), "little")

    def write(self, register: Register, value: int) -> None:
        self.transport.write(int(register), (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    @property
    def status(self) -> int:
        return self.read(Register.STATUS)

    def config_u16(self, offset: int) -> int:
        return int.from_bytes(self.transport.read(0x100 + offset, 2), "little")

    def features(self) -> int:
        words = []
        for word in (0, 1):
            self.write(Register.DEVICE_FEATURES_SEL, word)
            words.append(self.read(Register.DEVICE_FEATURES))
        return words[0] | words[1] << 32

    def bring_up(self, queues: tuple[int, ...] = (0,), size: int = 16,
                 features: int = VIRTIO_F_VERSION_1) -> None:
        """ACKNOWLEDGE, DRIVER, ``features``, FEATURES_OK, ``queues`` set up, DRIVER_OK."""
        self.write(Register.STATUS, int(DeviceStatus.ACKNOWLEDGE))
        self.write(Register.STATUS, int(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER))
        for word in (0, 1):
            self.write(Register.DRIVER_FEATURES_SEL, word)
            self.write(Register.DRIVER_FEATURES, features >> (32 * word) & 0xFFFF_FFFF)
        self.write(Register.STATUS, int(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
                                        | DeviceStatus.FEATURES_OK))
        for index in queues:
            base = RING_BASE + index * RING_STRIDE
            self.write(Register.QUEUE_SEL, index)
            self.write(Register.QUEUE_NUM, size)
            for low, address in ((Register.QUEUE_DESC_LOW, base),
                                 (Register.QUEUE_DRIVER_LOW, base + 0x1000),
                                 (Register.QUEUE_DEVICE_LOW, base + 0x2000)):
                self.write(low, address)
                self.write(Register(int(low) + 4), 0)
            self.write(Register.QUEUE_READY, 1)
        self.write(Register.STATUS, OK_STATUS)

    def reset(self) -> None:
        """Write 0 to Status (returns when the transport lets the vCPU go)."""
        self.write(Register.STATUS, 0)


def drain_interrupts(slot: VirtioMmioSlot) -> int:
    """How many interrupts the slot raised since the last call (its irqfd's counter)."""
    try:
        return os.eventfd_read(slot.irq_fd)
    except BlockingIOError:
        return 0
