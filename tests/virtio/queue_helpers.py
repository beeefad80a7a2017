"""A driver-side test double for split virtqueues, for queue and device tests.

:class:`DriverQueue` plays the guest driver: it lays out a descriptor table, an available
ring and a used ring in a :class:`~avmm.memory.MemoryAccess` (usually a
:class:`~avmm.memory.ByteArrayMemory`), allocates data buffers after them, adds chains
and reads used entries back. :func:`make_queue` returns a :class:`VirtQueue` (the device
side) already wired to the same addresses and ready, so a device test is::

    queue, driver = make_queue(size=16)
    head = driver.add_chain(readable=[request_header, payload], writable=[1])
    chain = queue.pop(driver.memory)          # or run the device against the queue
    ...
    queue.push(driver.memory, chain.head, written)
    assert driver.used() == [(head, written)]
    assert driver.writable_data(head) == b"\\x00"

Hostile rings are built with the low-level methods (:meth:`~DriverQueue.set_descriptor`,
:meth:`~DriverQueue.make_available`, :meth:`~DriverQueue.set_avail_idx`), which write
exactly what they are told and check nothing.

Default layout from ``base_address`` (each part aligned to 16 bytes, so also to what the
spec requires)::

    base_address                 descriptor table   16 * size
    + 16 * size                  available ring     6 + 2 * size (flags, idx, ring, used_event)
    next 16-byte boundary        used ring          6 + 8 * size (flags, idx, ring, avail_event)
    next 64-byte boundary        data area          buffers and indirect tables, up to the
                                                    end of memory (or data_size bytes)

The data area is used as a ring: allocations go forward and wrap around to its start,
skipping nothing but refusing (RuntimeError) to overlap the data of a chain that the
device has not returned yet.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from avmm.memory import ByteArrayMemory, MemoryAccess
from avmm.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VirtQueue,
)

__all__ = [
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "ChainRecord",
    "DriverQueue",
    "make_queue",
]

_DESCRIPTOR = struct.Struct("<QIHH")


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


@dataclass
class ChainRecord:
    """What the driver remembers about a chain it added (kept until the head is reused)."""

    head: int
    #: (address, length) of each device-readable / device-writable buffer, in order.
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    #: Descriptor table entries the chain occupies (just the head for an indirect chain).
    descriptors: list[int]
    #: (start, end) ranges of the data area this chain uses.
    data: list[tuple[int, int]] = field(default_factory=list)
    #: Indirect table address, if any.
    indirect_table: int | None = None
    #: Set by :meth:`DriverQueue.used` when the device returns the chain.
    used_length: int | None = None


class DriverQueue:
    """The driver's view of one split virtqueue in ``memory``.

    ``size`` is the queue size (a power of two). ``event_idx`` makes the driver keep
    ``used_event`` and read ``avail_event`` (it only changes what :meth:`used` and
    :meth:`needs_kick` do; the device side's feature is set by :func:`make_queue`).
    ``start_index`` starts the available and used indices there instead of 0 (to test
    u16 wraparound).
    """

    def __init__(
        self,
        memory: MemoryAccess,
        size: int,
        base_address: int = 0x1000,
        *,
        event_idx: bool = False,
        descriptor_table: int | None = None,
        available_ring: int | None = None,
        used_ring: int | None = None,
        data_address: int | None = None,
        data_size: int | None = None,
        start_index: int = 0,
    ) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"queue size must be a power of two, got {size}")
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.descriptor_table = base_address if descriptor_table is None else descriptor_table
        self.available_ring = (self.descriptor_table + 16 * size
                               if available_ring is None else available_ring)
        self.used_ring = (_align(self.available_ring + 6 + 2 * size, 16)
                          if used_ring is None else used_ring)
        ring_end = max(self.descriptor_table + 16 * size, self.available_ring + 6 + 2 * size,
                       self.used_ring + 6 + 8 * size)
        self.data_start = _align(ring_end, 64) if data_address is None else data_address
        if data_size is None:
            memory_size = getattr(memory, "size", None)
            if memory_size is None:
                raise ValueError("memory has no size attribute: pass data_size")
            data_size = memory_size - self.data_start
        if data_size <= 0:
            raise ValueError("no room for data buffers after the rings")
        self.data_end = self.data_start + data_size
        self._data_next = self.data_start

        self._free: deque[int] = deque(range(size))
        self.chains: dict[int, ChainRecord] = {}
        self._in_flight: set[int] = set()
        #: Chains added to the ring but not yet made visible by :meth:`publish`.
        self.unpublished = 0
        self.last_seen_used = start_index & 0xFFFF

        # What a driver does when it sets a queue up: zero the rings.
        memory.write(self.descriptor_table, bytes(16 * size))
        memory.write(self.available_ring, bytes(6 + 2 * size))
        memory.write(self.used_ring, bytes(6 + 8 * size))
        memory.write_u16(self.available_ring + 2, start_index & 0xFFFF)
        memory.write_u16(self.used_ring + 2, start_index & 0xFFFF)

    # -- high level -----------------------------------------------------------------------

    def add_chain(
        self,
        readable: Iterable[bytes] = (),
        writable: Iterable[int] = (),
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> int:
        """Add a chain: one device-readable buffer per item of ``readable`` (filled with
        those bytes), then one zero-filled device-writable buffer per size in
        ``writable``. With ``indirect`` all of them go into one indirect table and the
        chain is a single INDIRECT descriptor. Returns the head index.

        With ``publish`` (the default) the available idx moves at once; otherwise the
        chain waits in the ring for :meth:`publish`.
        """
        readable = [bytes(data) for data in readable]
        writable = list(writable)
        count = len(readable) + len(writable)
        if count == 0:
            raise ValueError("a chain needs at least one buffer")
        record = ChainRecord(head=-1, readable=[], writable=[], descriptors=[])
        buffers: list[tuple[int, int, int]] = []  # (address, length, flags)
        for data in readable:
            address = self.alloc_data(len(data), record)
            self.memory.write(address, data)
            record.readable.append((address, len(data)))
            buffers.append((address, len(data), 0))
        for length in writable:
            address = self.alloc_data(length, record)
            self.memory.write(address, bytes(length))
            record.writable.append((address, length))
            buffers.append((address, length, VIRTQ_DESC_F_WRITE))

        if indirect:
            table = self.alloc_data(16 * count, record)
            for i, (address, length, flags) in enumerate(buffers):
                more = i + 1 < count
                self.memory.write(table + 16 * i, _DESCRIPTOR.pack(
                    address, length, flags | (VIRTQ_DESC_F_NEXT if more else 0),
                    i + 1 if more else 0))
            record.indirect_table = table
            head = self._take_descriptors(1)[0]
            self.set_descriptor(head, table, 16 * count, VIRTQ_DESC_F_INDIRECT)
            record.descriptors = [head]
        else:
            indices = self._take_descriptors(count)
            for i, (address, length, flags) in enumerate(buffers):
                more = i + 1 < count
                self.set_descriptor(indices[i], address, length,
                                    flags | (VIRTQ_DESC_F_NEXT if more else 0),
                                    indices[i + 1] if more else 0)
            head = indices[0]
            record.descriptors = indices
        record.head = head
        self.chains[head] = record
        self._in_flight.add(head)
        self.make_available(head, publish=publish)
        return head

    def publish(self) -> int:
        """Make every chain added with ``publish=False`` visible (move the available
        idx); returns how many."""
        count = self.unpublished
        self.set_avail_idx(self.avail_idx + count)
        self.unpublished = 0
        return count

    def used(self) -> list[tuple[int, int]]:
        """The used elements ``(id, len)`` the device added since the last call, in
        order. Their descriptors go back to the free list; the chain records stay in
        :attr:`chains` (with ``used_length`` set) until the head is reused."""
        used_idx = self.used_idx
        entries = []
        while self.last_seen_used != used_idx:
            slot = self.used_ring + 4 + 8 * (self.last_seen_used % self.size)
            head, length = self.memory.read_u32(slot), self.memory.read_u32(slot + 4)
            entries.append((head, length))
            self.last_seen_used = (self.last_seen_used + 1) & 0xFFFF
            record = self.chains.get(head)
            if record is not None and head in self._in_flight:
                self._in_flight.discard(head)
                record.used_length = length
                self._free.extend(record.descriptors)
        if self.event_idx:
            # Ask for an interrupt at the next used buffer, as Linux does by default.
            self.set_used_event(self.last_seen_used)
        return entries

    def writable_data(self, head: int, length: int | None = None) -> bytes:
        """The chain's device-writable buffers, concatenated (the first ``length`` bytes;
        ``None``: all of them)."""
        data = b"".join(self.memory.read(address, size)
                        for address, size in self.chains[head].writable)
        return data if length is None else data[:length]

    def readable_data(self, head: int) -> bytes:
        """The chain's device-readable buffers, concatenated."""
        return b"".join(self.memory.read(address, size)
                        for address, size in self.chains[head].readable)

    def needs_kick(self, old_avail_idx: int) -> bool:
        """Whether a driver that moved the available idx from ``old_avail_idx`` to its
        current value must notify the device (NO_NOTIFY flag, or vring_need_event on
        ``avail_event`` with EVENT_IDX)."""
        new = self.avail_idx
        if self.event_idx:
            event = self.avail_event
            return ((new - event - 1) & 0xFFFF) < ((new - old_avail_idx) & 0xFFFF)
        return not self.used_flags & 1

    @property
    def in_flight(self) -> int:
        """Chains added and not yet seen back in the used ring."""
        return len(self._in_flight)

    # -- data area ------------------------------------------------------------------------

    def alloc_data(self, length: int, record: ChainRecord | None = None,
                   alignment: int = 16) -> int:
        """``length`` bytes of the data area (recorded on ``record`` when given)."""
        address = _align(self._data_next, alignment)
        if address + length > self.data_end:
            address = self.data_start
            if address + length > self.data_end:
                raise RuntimeError(f"test driver: {length} bytes do not fit the data area")
        end = address + length
        for head in self._in_flight:
            for start, stop in self.chains[head].data:
                if address < stop and start < end and length:
                    raise RuntimeError(
                        "test driver out of buffer space: the device still holds chain "
                        f"{head} (return chains, or give the queue more memory)")
        self._data_next = end
        if record is not None:
            record.data.append((address, end))
        return address

    def _take_descriptors(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(
                f"test driver: {count} descriptors wanted, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    # -- low level: writes exactly what it is told ----------------------------------------

    def set_descriptor(self, index: int, address: int, length: int, flags: int = 0,
                       next_index: int = 0) -> None:
        """Write descriptor ``index`` of the queue's table."""
        self.memory.write(self.descriptor_table + 16 * index,
                          _DESCRIPTOR.pack(address, length, flags, next_index))

    def descriptor(self, index: int) -> tuple[int, int, int, int]:
        """Descriptor ``index``: (addr, len, flags, next)."""
        return _DESCRIPTOR.unpack(self.memory.read(self.descriptor_table + 16 * index, 16))

    @staticmethod
    def pack_descriptors(descriptors: Sequence[tuple[int, int, int, int]]) -> bytes:
        """(addr, len, flags, next) tuples as a descriptor table (for indirect tables)."""
        return b"".join(_DESCRIPTOR.pack(*d) for d in descriptors)

    def make_available(self, head: int, *, publish: bool = True) -> None:
        """Put ``head`` in the next available ring slot (any value, even an invalid
        one) and, with ``publish``, move the available idx past it (and any earlier
        unpublished chains)."""
        slot = (self.avail_idx + self.unpublished) % self.size
        self.memory.write_u16(self.available_ring + 4 + 2 * slot, head & 0xFFFF)
        self.unpublished += 1
        if publish:
            self.publish()

    def set_ring_entry(self, slot: int, head: int) -> None:
        """Write available ring slot ``slot`` (0..size-1) directly."""
        self.memory.write_u16(self.available_ring + 4 + 2 * slot, head)

    @property
    def avail_idx(self) -> int:
        return self.memory.read_u16(self.available_ring + 2)

    def set_avail_idx(self, value: int) -> None:
        self.memory.write_u16(self.available_ring + 2, value & 0xFFFF)

    @property
    def avail_flags(self) -> int:
        return self.memory.read_u16(self.available_ring)

    def set_avail_flags(self, value: int) -> None:
        """1 = VIRTQ_AVAIL_F_NO_INTERRUPT."""
        self.memory.write_u16(self.available_ring, value)

    @property
    def used_event(self) -> int:
        return self.memory.read_u16(self.available_ring + 4 + 2 * self.size)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.available_ring + 4 + 2 * self.size, value & 0xFFFF)

    @property
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used_ring + 2)

    @property
    def used_flags(self) -> int:
        """Bit 0 = VIRTQ_USED_F_NO_NOTIFY, set by the device."""
        return self.memory.read_u16(self.used_ring)

    @property
    def avail_event(self) -> int:
        return self.memory.read_u16(self.used_ring + 4 + 8 * self.size)

    def used_element(self, slot: int) -> tuple[int, int]:
        """Used ring slot ``slot`` (0..size-1): (id, len)."""
        address = self.used_ring + 4 + 8 * slot
        return self.memory.read_u32(address), self.memory.read_u32(address + 4)

    def configure(self, queue: VirtQueue, *, event_idx: bool | None = None,
                  indirect: bool = True, ready: bool = True) -> VirtQueue:
        """Point ``queue``'s state at this layout, as a transport would after the driver
        set the queue up (and positions at the current indices)."""
        s = queue.state
        s.size = self.size
        s.descriptor_table = self.descriptor_table
        s.available_ring = self.available_ring
        s.used_ring = self.used_ring
        s.next_available = self.avail_idx
        s.next_used = self.used_idx
        s.event_idx = self.event_idx if event_idx is None else event_idx
        s.indirect = indirect
        s.ready = ready
        s.signalled_used = None
        return queue


def make_queue(
    size: int = 16,
    *,
    memory: MemoryAccess | None = None,
    memory_size: int = 1 << 20,
    base_address: int = 0x1000,
    max_size: int | None = None,
    event_idx: bool = False,
    indirect: bool = True,
    start_index: int = 0,
) -> tuple[VirtQueue, DriverQueue]:
    """A ready :class:`VirtQueue` and the :class:`DriverQueue` that feeds it, sharing one
    layout in ``memory`` (a fresh ``ByteArrayMemory(memory_size)`` by default; reach it
    as ``driver.memory``). ``indirect``/``event_idx`` are the negotiated features."""
    if memory is None:
        memory = ByteArrayMemory(memory_size)
    driver = DriverQueue(memory, size, base_address, event_idx=event_idx,
                         start_index=start_index)
    queue = VirtQueue(max_size or size)
    driver.configure(queue, indirect=indirect)
    queue.validate(memory)
    return queue, driver
