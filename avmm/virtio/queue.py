"""A split virtqueue, device side (virtio 1.2 §2.7), sans-IO.

The queue reads and writes guest memory handed to it on every call and knows nothing of
how notifications travel (eventfds, irqfds, trio): :meth:`VirtQueue.pop` and
:meth:`VirtQueue.push` move buffers, :meth:`VirtQueue.should_notify` says whether the
driver wants an interrupt, and the caller delivers it. Only modern devices
(VIRTIO_F_VERSION_1) are served, so every ring field is little-endian.

Layout of the three parts (the spec's table; ``N`` is the queue size, a power of two)::

    descriptor table  16-aligned  N x {le64 addr, le32 len, le16 flags, le16 next}
    available ring     2-aligned  le16 flags, le16 idx, le16 ring[N], le16 used_event
    used ring          4-aligned  le16 flags, le16 idx, {le32 id, le32 len}[N], le16 avail_event

``used_event`` and ``avail_event`` exist only when VIRTIO_F_EVENT_IDX was negotiated.

The guest is not trusted. Everything the driver wrote is read once, checked, and any
breach of the spec's rules raises :class:`QueueError` naming what was wrong: addresses
and lengths outside RAM, a head or ``next`` index past the table, chains that loop (a
chain visiting more descriptors than its table holds), more than 2^32 bytes in a chain,
device-readable buffers after device-writable ones, indirect tables where the feature was
not negotiated, nested, combined with NEXT or of a length that is not a non-zero multiple
of 16, and an available index that runs more than the queue size ahead of the device.
No other exception escapes because of what a guest wrote.

Memory ordering. The driver and the device share these rings without locks, so the
order of our accesses matters (the spec's "suitable memory barrier" steps):

* ``pop`` reads the available ``idx`` once, then the ring entry, then each descriptor
  once (``unpack_from`` copies the values, so a descriptor the guest rewrites behind our
  back cannot pass the checks with one value and be used with another). x86 does not
  reorder loads with other loads, and the driver publishes ``idx`` after the ring entry
  and descriptors (its write barrier), so anything ``idx`` made visible is seen.
* ``push`` stores the used element and then the used ``idx``; x86 does not reorder
  stores with other stores, and each store is a separate call into C that the compiler
  cannot move across. Whatever a device wrote into the buffers went before, too.
* ``should_notify`` and ``enable_notifications`` store (used ``idx``; flags or
  ``avail_event``) and then load what the driver wrote (``used_event``/flags; avail
  ``idx``). Store-then-load is the one reordering x86 does allow, so a full barrier
  sits in between (:func:`_full_barrier`); without it a notification can be lost and
  the guest hangs.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, fields
from typing import ClassVar, NamedTuple

from ..errors import GuestAddressError
from ..memory import MemoryAccess
from ..state._widths import U16, U32, U64
from .device import DeviceNeedsReset

__all__ = [
    "MAX_INDIRECT_DESCRIPTORS",
    "MAX_QUEUE_SIZE",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "Buffer",
    "DescriptorChain",
    "QueueError",
    "QueueState",
    "SavedQueueState",
    "VirtQueue",
]

#: Descriptor flags (virtio 1.2 §2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
#: Available ring flag: the driver does not want used buffer notifications.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
#: Used ring flag: the device does not want available buffer notifications.
VIRTQ_USED_F_NO_NOTIFY = 1

#: The largest queue size the spec allows (the largest power of two a u16 index can
#: tell full from empty with).
MAX_QUEUE_SIZE = 32768
#: Our "reasonable limit" (spec §2.7.4) on the entries of one indirect table. A table's
#: own length already bounds a walk, but a u32 length would allow 2^28 hops; this keeps
#: one chain's cost at what the largest direct chain may cost.
MAX_INDIRECT_DESCRIPTORS = MAX_QUEUE_SIZE
#: A chain may describe at most 2^32 bytes in total (spec §2.7.5.1).
MAX_CHAIN_BYTES = 1 << 32

_DESCRIPTOR = struct.Struct("<QIHH")
_USED_ELEMENT = struct.Struct("<II")
_unpack_descriptor = _DESCRIPTOR.unpack_from
_pack_used_element = _USED_ELEMENT.pack_into
_tuple_new = tuple.__new__

_barrier_lock = threading.Lock()


def _full_barrier() -> None:
    """Order this thread's earlier stores before its later loads.

    A lock round trip is an atomic read-modify-write (a LOCK-prefixed instruction on
    x86), and those are full barriers: the cheapest one pure Python can issue.
    """
    _barrier_lock.acquire()
    _barrier_lock.release()


class QueueError(DeviceNeedsReset):
    """The driver broke the virtqueue rules; the message says exactly how.

    The device cannot trust the queue any more: the transport sets DEVICE_NEEDS_RESET.
    """


@dataclass
class QueueState:
    """Everything a snapshot of one queue needs, as plain values.

    The transport writes the driver's choices here (size, addresses, ``ready``, the
    negotiated ``event_idx``/``indirect``) and calls :meth:`VirtQueue.validate` before
    the device uses the queue. ``size`` left at ``-1`` means ``max_size``.
    """

    #: What the device offers (QueueNumMax), a power of two.
    max_size: int
    #: What the driver chose (QueueNum).
    size: int = -1
    ready: bool = False
    #: Guest physical addresses of the three parts.
    descriptor_table: int = 0
    available_ring: int = 0
    used_ring: int = 0
    #: The device's position in the available ring (free-running u16).
    next_available: int = 0
    #: The device's position in the used ring (free-running u16) = the used idx published.
    next_used: int = 0
    #: VIRTIO_F_EVENT_IDX was negotiated.
    event_idx: bool = False
    #: VIRTIO_F_INDIRECT_DESC was negotiated.
    indirect: bool = False
    #: The used idx when :meth:`VirtQueue.should_notify` last looked (None: never, so
    #: the next look notifies). With EVENT_IDX the driver's ``used_event`` is checked
    #: against the used entries added since then.
    signalled_used: int | None = None

    def __post_init__(self) -> None:
        if self.size == -1:
            self.size = self.max_size


@dataclass(frozen=True)
class SavedQueueState:
    """A queue's :class:`QueueState` as saved in a snapshot: the same fields, frozen,
    versioned and with the widths the codec checks (avmm/state/codec.py). The live
    :class:`QueueState` stays a mutable record: the queue moves its positions in place
    on every request.

    For a vhost-user device ``next_available`` is the back-end's position as
    GET_VRING_BASE returned it when the rings stopped (the slot pauses the device
    before it saves), and ``next_used`` is not tracked by the front-end: the used idx
    in guest memory (saved with it) is the truth there.
    """

    STATE_VERSION: ClassVar[int] = 1

    max_size: U16
    #: What the driver wrote to QueueNum (validated only at DRIVER_OK, so any u32).
    size: U32
    ready: bool
    descriptor_table: U64
    available_ring: U64
    used_ring: U64
    next_available: U16
    next_used: U16
    event_idx: bool
    indirect: bool
    signalled_used: U16 | None

    @classmethod
    def of(cls, state: QueueState) -> SavedQueueState:
        return cls(**{field.name: getattr(state, field.name) for field in fields(QueueState)})

    def live(self) -> QueueState:
        """A new live record with these values."""
        return QueueState(**{field.name: getattr(self, field.name)
                             for field in fields(QueueState)})


class Buffer(NamedTuple):
    """One guest-physical, contiguous piece of a descriptor chain (never zero-length)."""

    address: int
    length: int


@dataclass(frozen=True, slots=True)
class DescriptorChain:
    """A checked descriptor chain: every buffer lies inside guest RAM, the total is at
    most 2^32 bytes, and zero-length descriptors are left out.

    ``head`` is what goes back to the used ring (``VirtQueue.push(memory, chain.head,
    written)``).
    """

    head: int
    #: Device-readable buffers, in chain order.
    readable: tuple[Buffer, ...]
    #: Device-writable buffers, in chain order.
    writable: tuple[Buffer, ...]

    # Plain loops, not sum() over a generator: chains are short, and these run for every
    # request of every device.

    @property
    def readable_length(self) -> int:
        total = 0
        for buffer in self.readable:
            total += buffer[1]
        return total

    @property
    def writable_length(self) -> int:
        total = 0
        for buffer in self.writable:
            total += buffer[1]
        return total

    def read(self, memory: MemoryAccess, offset: int = 0, length: int | None = None) -> bytes:
        """Gather ``length`` bytes of the device-readable buffers, from byte ``offset``
        of their concatenation (``None``: everything from ``offset`` on, possibly none).

        Raises QueueError if the chain holds fewer readable bytes than asked for (the
        driver sent a request too short to parse), ValueError for a negative offset or
        length (a device bug).
        """
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"negative offset {offset} or length {length}")
        readable = self.readable
        # The usual case: the whole read falls inside the first buffer.
        if readable and length is not None and offset + length <= readable[0].length:
            address = readable[0].address + offset
            try:
                return bytes(memory.view(address, length))
            except GuestAddressError as e:
                raise QueueError(f"chain {self.head}: readable buffer left RAM: {e}") from e
        total = self.readable_length
        if length is None:
            length = max(total - offset, 0)
        elif offset + length > total:
            raise QueueError(
                f"chain {self.head}: wanted {length} readable bytes at offset {offset}, "
                f"but the chain has only {total} readable bytes"
            )
        parts = []
        try:
            for address, size in readable:
                if not length:
                    break
                if offset >= size:
                    offset -= size
                    continue
                take = min(size - offset, length)
                parts.append(memory.view(address + offset, take))
                length -= take
                offset = 0
        except GuestAddressError as e:
            raise QueueError(f"chain {self.head}: readable buffer left RAM: {e}") from e
        return b"".join(parts)

    def write(self, memory: MemoryAccess, data: bytes | bytearray | memoryview,
              offset: int = 0) -> int:
        """Scatter ``data`` into the device-writable buffers from byte ``offset`` of
        their concatenation. Returns how many bytes were written: fewer than
        ``len(data)`` (possibly 0) where the writable space ends first."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        source = memoryview(data).cast("B")
        remaining = len(source)
        done = 0
        try:
            for address, size in self.writable:
                if not remaining:
                    break
                if offset >= size:
                    offset -= size
                    continue
                take = min(size - offset, remaining)
                memory.view(address + offset, take)[:] = source[done:done + take]
                # After the write (see avmm.migration.dirty): a migration sends it.
                dirty = memory.dirty
                if dirty is not None:
                    dirty.mark(address + offset, take)
                done += take
                remaining -= take
                offset = 0
        except GuestAddressError as e:
            raise QueueError(f"chain {self.head}: writable buffer left RAM: {e}") from e
        return done


# DescriptorChain(head, readable, writable) without the frozen dataclass's __init__
# (object.__setattr__ per field): the slots' own descriptors set the fields directly.
# One chain per request makes the difference measurable.
_new_object = object.__new__
_set_head = DescriptorChain.head.__set__  # type: ignore[attr-defined]
_set_readable = DescriptorChain.readable.__set__  # type: ignore[attr-defined]
_set_writable = DescriptorChain.writable.__set__  # type: ignore[attr-defined]


def _new_chain(head: int, readable: tuple[Buffer, ...],
               writable: tuple[Buffer, ...]) -> DescriptorChain:
    chain = _new_object(DescriptorChain)
    _set_head(chain, head)
    _set_readable(chain, readable)
    _set_writable(chain, writable)
    return chain


def _is_queue_size(size: int) -> bool:
    return 0 < size <= MAX_QUEUE_SIZE and not size & (size - 1)


class VirtQueue:
    """The device side of one split virtqueue.

    All state lives in :attr:`state` (plain values; a transport may read it for a
    snapshot or replace it on restore). Every method takes the guest memory to work on.
    Methods that read what the guest wrote raise :class:`QueueError` for anything the
    spec forbids, and nothing else for anything a guest can do.

    One task serves a queue: the methods are not safe to call from two threads at
    once. Besides :attr:`state` the object holds a cache (views of the available ring
    and descriptor table, read, and of the used ring, written, rebuilt whenever the
    memory object, the size or those addresses differ from the last :meth:`pop` or
    :meth:`push`) and the chains taken and not yet returned, which :meth:`give_back`
    hands back when the device stops without a reset (a vhost-user ring stop, later a
    snapshot): after it the queue holds nothing that :attr:`state` does not say.
    """

    def __init__(self, max_size: int) -> None:
        if not isinstance(max_size, int) or not _is_queue_size(max_size):
            raise ValueError(
                f"queue max size must be a power of two from 1 to {MAX_QUEUE_SIZE}, "
                f"got {max_size!r}"
            )
        self.state = QueueState(max_size=max_size)
        #: By head: the available-ring position it was taken from, -1 once returned (or
        #: never taken). A list, not a dict: pop and push pay one store each.
        self._taken_at = [-1] * max_size
        self._forget_rings()

    def __repr__(self) -> str:
        s = self.state
        return (f"<VirtQueue size={s.size}/{s.max_size} ready={s.ready} "
                f"avail={s.next_available} used={s.next_used}>")

    # -- setup --------------------------------------------------------------------------

    def validate(self, memory: MemoryAccess) -> None:
        """Check the driver's size choice and ring placement: power-of-two size no
        larger than the maximum, each part aligned as the spec requires (descriptor
        table 16, available ring 2, used ring 4) and wholly inside guest RAM, event
        fields included when EVENT_IDX was negotiated. Raises QueueError."""
        s = self.state
        if not _is_queue_size(s.size) or s.size > s.max_size:
            raise QueueError(
                f"queue size {s.size} is not a power of two from 1 to {s.max_size}"
            )
        for name, value in (("next_available", s.next_available),
                            ("next_used", s.next_used)):
            if not 0 <= value <= 0xFFFF:
                raise QueueError(f"queue {name} index {value} is not a u16")
        event = 2 if s.event_idx else 0
        for part, address, alignment, length in (
            ("descriptor table", s.descriptor_table, 16, 16 * s.size),
            ("available ring", s.available_ring, 2, 4 + 2 * s.size + event),
            ("used ring", s.used_ring, 4, 4 + 8 * s.size + event),
        ):
            if address % alignment:
                raise QueueError(
                    f"queue {part} at 0x{address:x} is not {alignment}-byte aligned"
                )
            if not memory.contains(address, length):
                raise QueueError(
                    f"queue {part} at 0x{address:x}..0x{address + length:x} "
                    f"({length} bytes for size {s.size}) is not inside guest RAM"
                )

    def reset(self) -> None:
        """Back to the initial state: size = max_size, not ready, addresses and
        positions 0, no features. Mutates :attr:`state` in place."""
        initial = QueueState(max_size=self.state.max_size)
        for field in fields(QueueState):
            setattr(self.state, field.name, getattr(initial, field.name))
        self._taken_at = [-1] * len(self._taken_at)
        self._forget_rings()

    def load_state(self, state: QueueState) -> None:
        """Take ``state`` as the queue's (a restore): nothing is held (a saved queue
        holds no chain: chains are given back before a save), and the ring views are
        taken again on the next use."""
        self.state = state
        self._taken_at = [-1] * max(len(self._taken_at), state.max_size)
        self._forget_rings()

    # -- the available ring -------------------------------------------------------------

    def pop(self, memory: MemoryAccess) -> DescriptorChain | None:
        """The next available descriptor chain, checked; None when the driver has made
        nothing new available (or the queue is not ready).

        The device's position moves past the chain only when it is valid; a hostile
        ring or chain raises QueueError and leaves the position at it.
        """
        s = self.state
        if not s.ready:
            return None
        size = s.size
        if (memory is not self._views_memory or size != self._views_size
                or s.available_ring != self._views_available
                or s.descriptor_table != self._views_table):
            self._map_rings(memory)
        next_available = s.next_available
        available = self._available_u16
        # The available idx is read exactly once: it bounds what this pop may look at.
        available_idx = available[1]
        pending = (available_idx - next_available) & 0xFFFF
        if not pending:
            return None
        if pending > size:
            raise QueueError(
                f"available idx {available_idx} is {pending} entries ahead of the "
                f"device's position {next_available}, more than the queue size {size}"
            )
        head = available[2 + (next_available & (size - 1))]
        if head >= size:
            raise QueueError(
                f"available ring entry {next_available} names head descriptor {head}, "
                f"past the end of the {size}-entry descriptor table"
            )
        descriptor = _unpack_descriptor(self._table_view, head << 4)
        address, length, flags, _ = descriptor
        if flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT):
            chain = self._walk(memory, head, descriptor)
        else:
            # The common case, a chain of one descriptor: the same checks, less work.
            if not length:
                buffers: tuple[Buffer, ...] = ()
            elif memory.contains(address, length):
                buffers = (_tuple_new(Buffer, (address, length)),)
            else:
                raise QueueError(self._where(head, head, None) + (
                    f"buffer 0x{address:x}..0x{address + length:x} ({length} bytes) "
                    "is not inside guest RAM"
                ))
            if flags & VIRTQ_DESC_F_WRITE:
                chain = _new_chain(head, (), buffers)
            else:
                chain = _new_chain(head, buffers, ())
        self._taken_at[head] = next_available
        s.next_available = (next_available + 1) & 0xFFFF
        return chain

    def _map_rings(self, memory: MemoryAccess) -> None:
        """Take views of the available ring and the descriptor table for ``pop``.

        The device only ever reads these two parts, so the views are kept across calls
        while the memory object and the layout stay the same (two ``view`` calls saved
        per pop). The used ring has its own cache, kept by ``push``.
        """
        s = self.state
        size = s.size
        if not 0 < size <= s.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two from 1 to {s.max_size}")
        self._views_memory = None
        try:
            available = memory.view(s.available_ring, 4 + 2 * size)
        except GuestAddressError as e:
            raise QueueError(f"queue available ring outside guest RAM: {e}") from e
        try:
            table = memory.view(s.descriptor_table, size << 4)
        except GuestAddressError as e:
            raise QueueError(f"queue descriptor table outside guest RAM: {e}") from e
        self._fit_taken_at(size)
        self._available_view = available
        # Its u16 fields are read through a native "H" view: one 16-bit load each. The
        # driver may store a field at the same moment, and struct reads byte by byte: it
        # could combine the old low byte with the new high byte.
        self._available_u16 = available.cast("H")
        self._table_view = table
        self._views_size = size
        self._views_available = s.available_ring
        self._views_table = s.descriptor_table
        self._views_memory = memory

    def forget_views(self) -> None:
        """Drop the views of guest memory kept for ``pop`` and ``push``; the next use
        takes them again. A transport whose queue is served by a device thread calls it
        once the device has stopped, before it unmaps guest RAM: the last view of a
        mapping releases the mapping (and closes its fd), which must not happen on the
        next device thread, whose syscall filter may not allow it."""
        self._forget_rings()

    def _forget_rings(self) -> None:
        self._views_memory: MemoryAccess | None = None
        self._views_size = self._views_available = self._views_table = -1
        self._available_view = self._table_view = memoryview(b"")
        self._available_u16 = memoryview(b"").cast("H")
        self._used_memory: MemoryAccess | None = None
        self._used_key = (-1, -1)
        self._used_view = memoryview(b"")
        self._used_u16 = memoryview(b"").cast("H")

    def _walk(self, memory: MemoryAccess, head: int,
              descriptor: tuple[int, int, int, int]) -> DescriptorChain:
        """Follow the chain whose head descriptor (already read) is ``descriptor``;
        every rule of §2.7.5 is checked here. Each descriptor is read exactly once."""
        s = self.state
        table = self._table_view
        contains = memory.contains
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        seen_writable = False
        total = 0
        index = head
        limit = s.size  # entries in the table being walked: also the most hops it allows
        hops = 1
        indirect_table: int | None = None  # address of the indirect table being walked
        address, length, flags, next_index = descriptor
        while True:
            if flags & VIRTQ_DESC_F_INDIRECT:
                problem = None
                if not s.indirect:
                    problem = "INDIRECT flag set but VIRTIO_F_INDIRECT_DESC was not negotiated"
                elif indirect_table is not None:
                    problem = "INDIRECT flag set inside an indirect table"
                elif flags & VIRTQ_DESC_F_NEXT:
                    problem = "both INDIRECT and NEXT flags set"
                elif not length or length & 15:
                    problem = (f"indirect table length {length} is not a non-zero "
                               "multiple of 16")
                elif length >> 4 > MAX_INDIRECT_DESCRIPTORS:
                    problem = (f"indirect table of {length >> 4} descriptors exceeds the "
                               f"limit of {MAX_INDIRECT_DESCRIPTORS}")
                if problem:
                    raise QueueError(self._where(head, index, indirect_table) + problem)
                try:
                    table = memory.view(address, length)
                except GuestAddressError as e:
                    raise QueueError(self._where(head, index, indirect_table) + (
                        f"indirect table at 0x{address:x} ({length} bytes) "
                        "is not inside guest RAM"
                    )) from e
                indirect_table = address
                limit = length >> 4
                index = 0
                hops = 1
                address, length, flags, next_index = _unpack_descriptor(table, 0)
                continue
            if length:
                if not contains(address, length):
                    raise QueueError(self._where(head, index, indirect_table) + (
                        f"buffer 0x{address:x}..0x{address + length:x} ({length} bytes) "
                        "is not inside guest RAM"
                    ))
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise QueueError(self._where(head, index, indirect_table) + (
                        "chain describes more than 2^32 bytes in total"
                    ))
            if flags & VIRTQ_DESC_F_WRITE:
                seen_writable = True
                if length:
                    writable.append(_tuple_new(Buffer, (address, length)))
            else:
                if seen_writable:
                    raise QueueError(self._where(head, index, indirect_table) + (
                        "device-readable descriptor after a device-writable one"
                    ))
                if length:
                    readable.append(_tuple_new(Buffer, (address, length)))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if next_index >= limit:
                raise QueueError(self._where(head, index, indirect_table) + (
                    f"next index {next_index} is past the end of the {limit}-entry table"
                ))
            hops += 1
            if hops > limit:
                raise QueueError(self._where(head, next_index, indirect_table) + (
                    f"chain visits more than the {limit} descriptors its table holds "
                    "(a loop)"
                ))
            index = next_index
            address, length, flags, next_index = _unpack_descriptor(table, index << 4)
        return _new_chain(head, tuple(readable), tuple(writable))

    @staticmethod
    def _where(head: int, index: int, indirect_table: int | None) -> str:
        if indirect_table is None:
            return f"chain {head}, descriptor {index}: "
        return f"chain {head}, indirect table at 0x{indirect_table:x}, entry {index}: "

    # -- the used ring ------------------------------------------------------------------

    def push(self, memory: MemoryAccess, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written into its
        device-writable buffers, and publish the new used idx.

        Raises QueueError if the queue is not ready, ``head`` is not a descriptor index,
        ``written`` does not fit the u32 ``len`` field, or more chains would be returned
        than were taken.
        """
        s = self.state
        size = s.size
        next_used = s.next_used
        if not s.ready:
            raise QueueError(f"chain {head} returned to a queue that is not ready")
        if not 0 <= head < size:
            raise QueueError(f"chain head {head} returned to the used ring is not below "
                             f"the queue size {size}")
        if not 0 <= written <= 0xFFFFFFFF:
            raise QueueError(f"chain {head}: written length {written} does not fit in u32")
        if next_used == s.next_available:
            raise QueueError(f"chain {head} returned to the used ring, but every chain "
                             "taken from the available ring was returned already")
        if memory is not self._used_memory or self._used_key != (s.used_ring, size):
            self._map_used_ring(memory)
        # The element is stored before the idx that publishes it (see module doc).
        element = 4 + 8 * (next_used & (size - 1))
        _pack_used_element(self._used_view, element, head, written)
        next_used = (next_used + 1) & 0xFFFF
        self._used_u16[1] = next_used
        s.next_used = next_used
        self._taken_at[head] = -1
        # The used ring is written through a kept view: mark it here, while a migration
        # runs (memory.dirty is None otherwise).
        dirty = memory.dirty
        if dirty is not None:
            dirty.mark(s.used_ring + element, 8)
            dirty.mark(s.used_ring + 2, 2)

    # -- C loops that move the positions themselves (avmm.virtio.net_fast) --------------

    #: Whether code other than pop/push may take and return chains of this queue by
    #: moving ``state``'s positions and the used ring itself: true where pop and push do
    #: nothing but that (a subclass that records what it takes says no).
    direct_access: ClassVar[bool] = True

    def may_take(self) -> bool:
        """Whether a C loop may take chains now: the queue is ready, allows direct
        access, and (a served queue) the VM is not pausing. The caller also holds no
        chain of its own taken from it."""
        return self.state.ready and self.direct_access

    def take(self, memory: MemoryAccess) -> DescriptorChain | None:
        """:meth:`pop`, even where pops are held back (a served queue while the VM
        pauses): for the chain at the position when the device has written into its
        buffers already (a C loop's frame larger than the buffer)."""
        return self.pop(memory)

    def took(self, memory: MemoryAccess, chains: int, readable_bytes: int,
             written_bytes: int) -> None:
        """A C loop took the ``chains`` chains before the position and returned them, in
        order, as the last ``chains`` used entries (hook for counting and recording)."""

    @property
    def held(self) -> int:
        """How many chains were taken by :meth:`pop` and not yet returned by :meth:`push`."""
        return sum(position >= 0 for position in self._taken_at)

    def give_back(self, memory: MemoryAccess) -> tuple[int, int]:
        """Hand every chain taken and not returned back to the driver; call it once the
        device has stopped (its ``run`` ended) and before the queue's position is read
        for a ring stop or a snapshot. Returns (chains un-taken, chains returned empty).

        Chains at the end of what was taken (none returned after them: every device
        that completes in order) are un-taken: the position moves back over them, so
        they stay available and the device takes them again, re-read and re-checked,
        when it runs next. The driver never sees them go: its buffers and what it asked
        for are intact, and a device must treat whatever it wrote into them so far as
        not written (it was not: the driver reads a buffer only once it is used).

        A chain taken before one that was already returned cannot be un-taken (the
        position cannot skip the returned one), so it is returned used with length 0:
        the driver gets its buffer back empty, as after a request that produced nothing.
        That is safe for buffers whose meaning is their used length (receive buffers,
        entropy) but not for a request that reports its result in-band (a block
        request's status byte): devices that complete out of order must not stop with
        such chains held.
        """
        taken_at = self._taken_at
        held = {position: head for head, position in enumerate(taken_at) if position >= 0}
        if not held:
            return 0, 0
        s = self.state
        # Walk back from the position while the slot before it was taken and is held.
        position = s.next_available
        untaken = 0
        while (head := held.pop((position - 1) & 0xFFFF, None)) is not None:
            position = (position - 1) & 0xFFFF
            taken_at[head] = -1
            self._untaken(head)
            untaken += 1
        s.next_available = position
        returned = 0
        try:
            # Oldest first, as the driver would have got them.
            for _, head in sorted(held.items(), key=lambda item: (position - item[0]) & 0xFFFF,
                                  reverse=True):
                self.push(memory, head, 0)
                returned += 1
        finally:
            # Whatever push refused (a broken ring) is forgotten: never given twice.
            self._taken_at = [-1] * len(taken_at)
        return untaken, returned

    def _fit_taken_at(self, size: int) -> None:
        # A restored state may bring a larger queue than the one this object was made
        # for; pop and push index the list by head without a check.
        if len(self._taken_at) < size:
            self._taken_at.extend([-1] * (size - len(self._taken_at)))

    def _untaken(self, head: int) -> None:
        """Hook: ``give_back`` un-took chain ``head`` (for subclasses that keep a record
        of what was taken, such as vhost-user's inflight tracking)."""

    def _map_used_ring(self, memory: MemoryAccess) -> None:
        """Take views of the used ring (flags, idx and ring[size]) for ``push``, kept
        while the memory object, the size and the address stay the same."""
        s = self.state
        self._used_memory = None
        try:
            used = memory.view(s.used_ring, 4 + 8 * s.size)
        except GuestAddressError as e:
            raise QueueError(f"used ring outside guest RAM: {e}") from e
        self._fit_taken_at(s.size)
        self._used_view = used
        # The idx is stored through a native "H" view: one 16-bit store (struct writes
        # byte by byte, and a driver polling the used idx would see a torn value, e.g.
        # 0x00ff -> 0x0000 -> 0x0100).
        self._used_u16 = used.cast("H")
        self._used_key = (s.used_ring, s.size)
        self._used_memory = memory

    # -- notification suppression -------------------------------------------------------

    def should_notify(self, memory: MemoryAccess) -> bool:
        """After pushes: does the driver want a used buffer notification now?

        With EVENT_IDX: yes if the used entries added since the last call include index
        ``used_event`` (vring_need_event, modulo 2^16). Without: yes unless the driver set
        NO_INTERRUPT in the available ring's flags. No when nothing was pushed since the
        last call. Records the used idx in ``state.signalled_used``.

        Call it after every batch of pushes (at most 65535 of them: the window is
        measured modulo 2^16), and deliver the interrupt when it says yes.
        """
        s = self.state
        if not s.ready:
            return False
        new = s.next_used
        old = s.signalled_used
        s.signalled_used = new
        if old == new:
            return False
        # Our used idx store must be visible before we read what the driver wants,
        # or a driver that just re-armed would wait for an interrupt we skip.
        _full_barrier()
        try:
            if s.event_idx:
                if old is None:
                    return True
                used_event = memory.read_u16(s.available_ring + 4 + 2 * s.size)
                return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
            flags = memory.read_u16(s.available_ring)
        except GuestAddressError as e:
            raise QueueError(f"available ring outside guest RAM: {e}") from e
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def disable_notifications(self, memory: MemoryAccess) -> None:
        """Ask the driver not to notify while the device drains the ring.

        Without EVENT_IDX this sets NO_NOTIFY in the used ring's flags. With EVENT_IDX it
        does nothing: ``avail_event`` stays where :meth:`enable_notifications` left it,
        and once the driver has passed it, it does not notify again.
        """
        s = self.state
        if not s.ready or s.event_idx:
            return
        try:
            memory.write_u16(s.used_ring, VIRTQ_USED_F_NO_NOTIFY)
        except GuestAddressError as e:
            raise QueueError(f"used ring outside guest RAM: {e}") from e

    def enable_notifications(self, memory: MemoryAccess) -> bool:
        """Ask the driver to notify about the next buffer it makes available (clear
        NO_NOTIFY, or set ``avail_event`` to the device's position), then look again.

        Returns True if buffers are already available: the driver may have added them
        before it saw the request, without notifying, so the caller must drain again.
        """
        s = self.state
        if not s.ready:
            return False
        try:
            if s.event_idx:
                memory.write_u16(s.used_ring + 4 + 8 * s.size, s.next_available)
            else:
                memory.write_u16(s.used_ring, 0)
            # The request must be visible before we look at the available idx.
            _full_barrier()
            available_idx = memory.read_u16(s.available_ring + 2)
        except GuestAddressError as e:
            raise QueueError(f"queue ring outside guest RAM: {e}") from e
        return available_idx != s.next_available
