"""Descriptor chains for the device fuzzers (``fuzz_support.py``): the kinds of damage a
hostile driver does, a writer that lays chains out in a queue's table, indirect tables and
available ring, broken as asked, and the plain reading of virtio 1.2 §2.7.5 that says
what a device must accept (:func:`reference_chain`).
"""

from __future__ import annotations

import itertools
import random
import struct
from dataclasses import dataclass

from avmm.memory import ByteArrayMemory

from .queue_helpers import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DriverQueue,
)

INDIRECT, NEXT, WRITE = VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

#: Guest RAM of every episode. A chain of more than 2^32 bytes then takes 8193 buffers of
#: all of it, in one 128 KiB indirect table; less RAM would not hold that table, more
#: makes each episode's memory comparison slower.
RAM_SIZE = 1 << 19

DESCRIPTOR = struct.Struct("<QIHH")
_U64 = 1 << 64
_MAX_INDIRECT = 32768

# What a queue takes (the device's rules say which).
WRITABLE = "writable"  # device-writable buffers only: rng, receive queues
READABLE = "readable"  # device-readable buffers only: transmit queues
REQUEST = "request"  # device-readable, then device-writable: virtio-blk

WELL_FORMED = "well-formed"
# Hostile, and the queue must take them (what the device does is its business).
ZERO_LENGTH = "zero-length buffers"
ONLY_ZERO_LENGTH = "only zero-length buffers"
LONGER_THAN_QUEUE = "chain longer than the queue"
UNKNOWN_FLAGS = "unknown flag bits"
OVERLAPPING = "overlapping buffers"
DUPLICATE_HEAD = "head already in flight"
WRONG_DIRECTION = "wrong direction"
# Hostile, and the queue must refuse them.
LOOP = "looping chain"
NEXT_PAST_TABLE = "next index past the table"
HEAD_PAST_TABLE = "head index past the table"
OUTSIDE_RAM = "buffer outside RAM"
ADDRESS_WRAPS = "address+length past 2^64"
LENGTH_PAST_RAM = "length past the end of RAM"
OVER_4GIB = "chain over 2^32 bytes"
READABLE_AFTER_WRITABLE = "readable after writable"
INDIRECT_NOT_NEGOTIATED = "indirect not negotiated"
NESTED_INDIRECT = "nested indirect table"
INDIRECT_WITH_NEXT = "indirect with NEXT"
INDIRECT_BAD_LENGTH = "indirect table length not 16*n"
INDIRECT_OUTSIDE_RAM = "indirect table outside RAM"
AVAIL_JUMP = "avail idx jump"
#: A ring event, not a chain: the driver rewrote the descriptors of chains the device held.
REWRITTEN_IN_FLIGHT = "descriptors rewritten while the device held them"

REFUSED_KINDS = frozenset({
    LOOP, NEXT_PAST_TABLE, HEAD_PAST_TABLE, OUTSIDE_RAM, ADDRESS_WRAPS, LENGTH_PAST_RAM,
    OVER_4GIB, READABLE_AFTER_WRITABLE, INDIRECT_NOT_NEGOTIATED, NESTED_INDIRECT,
    INDIRECT_WITH_NEXT, INDIRECT_BAD_LENGTH, INDIRECT_OUTSIDE_RAM, AVAIL_JUMP,
})
#: Hostile kinds the queue takes and no device stops for (so they may go anywhere).
HARMLESS_RING_KINDS = (ZERO_LENGTH, UNKNOWN_FLAGS, OVERLAPPING, DUPLICATE_HEAD,
                       LONGER_THAN_QUEUE)
#: Kinds for the last chain of a queue, the one meant to stop the device.
FINAL_RING_KINDS = (LOOP, NEXT_PAST_TABLE, HEAD_PAST_TABLE, OUTSIDE_RAM, ADDRESS_WRAPS,
                    LENGTH_PAST_RAM, READABLE_AFTER_WRITABLE, WRONG_DIRECTION,
                    ONLY_ZERO_LENGTH)
#: Final kinds where VIRTIO_F_INDIRECT_DESC was negotiated.
INDIRECT_KINDS = (NESTED_INDIRECT, INDIRECT_WITH_NEXT, INDIRECT_BAD_LENGTH,
                  INDIRECT_OUTSIDE_RAM)

Range = tuple[int, int]  # (address, length)


@dataclass
class Request:
    """What a driver wants from one chain: device-readable buffers with these bytes,
    then device-writable buffers of these sizes. ``kind`` names what is wrong with the
    content, if anything (a device's own hostile kinds: "too-short header"...)."""

    readable: list[bytes]
    writable: list[int]
    kind: str = WELL_FORMED


@dataclass
class Planned:
    """One chain (or ring event) the driver made available, and the reference reading
    of it."""

    queue: int
    #: Its place in the ring: 0 for the first chain of the round.
    position: int
    #: The free-running available index it was made available at.
    slot: int
    head: int
    kind: str
    #: The reference walk refuses it (the device must stop there).
    refused: bool = False
    readable: tuple[Range, ...] = ()
    writable: tuple[Range, ...] = ()
    #: The device must raise DeviceNeedsReset on reaching it.
    stops: bool = False
    #: Its writable buffers are shared (overlapping, or the head is in flight twice): what
    #: they hold afterwards says nothing about one request.
    unreliable: bool = False
    #: Guest addresses of its descriptors (in the queue's table and its indirect table).
    descriptors: tuple[int, ...] = ()

    @property
    def readable_length(self) -> int:
        return sum(length for _, length in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(length for _, length in self.writable)

    def readable_bytes(self, memory: bytes | bytearray) -> bytes:
        return b"".join(memory[a:a + n] for a, n in self.readable)

    def writable_bytes(self, memory: bytes | bytearray, length: int | None = None) -> bytes:
        data = b"".join(memory[a:a + n] for a, n in self.writable)
        return data if length is None else data[:length]


class NoRoom(Exception):
    """The round's descriptor table or data area is full: place no more chains."""


# -- the reference reading -----------------------------------------------------------------


def reference_chain(memory: bytes | bytearray, size: int, table: int, head: int,
                    indirect: bool) -> tuple[list[Range], list[Range]] | None:
    """virtio 1.2 §2.7.5 read as plainly as possible: the chain's non-empty
    (readable, writable) buffers, or None where the device must refuse it."""
    ram = len(memory)
    if head >= size:
        return None
    readable: list[Range] = []
    writable: list[Range] = []
    total = 0
    seen_writable = False
    base, count, index, nested = table, size, head, False
    visited: set[int] = set()
    while True:
        if index in visited:
            return None  # a loop
        visited.add(index)
        address, length, flags, following = DESCRIPTOR.unpack_from(memory, base + 16 * index)
        if flags & INDIRECT:
            if (nested or not indirect or flags & NEXT or not length or length % 16
                    or length // 16 > _MAX_INDIRECT or address + length > ram):
                return None
            base, count, index, nested = address, length // 16, 0, True
            visited = set()
            continue
        if length:
            if address + length > ram:
                return None
            total += length
            if total > 1 << 32:
                return None
        if flags & WRITE:
            seen_writable = True
            if length:
                writable.append((address, length))
        else:
            if seen_writable:
                return None
            if length:
                readable.append((address, length))
        if not flags & NEXT:
            return readable, writable
        if following >= count:
            return None
        index = following


# -- the driver side: laying chains out ----------------------------------------------------


class ChainWriter:
    """Lays out one queue's chains for one round of the fuzzer: ``driver`` gives the
    layout (and a fresh ring), ``indirect`` says whether VIRTIO_F_INDIRECT_DESC was
    negotiated."""

    def __init__(self, memory: ByteArrayMemory, rng: random.Random, index: int,
                 driver: DriverQueue, *, indirect: bool) -> None:
        self.memory = memory
        self.rng = rng
        self.indirect = indirect
        self.index = index
        self.driver = driver
        self.size = driver.size
        self.free = list(range(self.size))
        rng.shuffle(self.free)
        self.cursor = driver.data_start
        self.next_slot = driver.avail_idx
        self.plans: list[Planned] = []

    @property
    def slots_left(self) -> int:
        return self.size - len(self.plans)

    def alloc(self, length: int) -> int:
        address = (self.cursor + 15) & ~15
        if address + length > self.driver.data_end:
            raise NoRoom
        self.cursor = address + length
        return address

    def take(self, count: int) -> list[int]:
        if count > len(self.free):
            raise NoRoom
        taken, self.free = self.free[:count], self.free[count:]
        return taken

    def _ring(self, head: int, plan: Planned) -> Planned:
        self.driver.set_ring_entry(self.next_slot % self.size, head)
        self.next_slot = (self.next_slot + 1) & 0xFFFF
        self.plans.append(plan)
        return plan

    def _plan(self, head: int, kind: str) -> Planned:
        return Planned(queue=self.index, position=len(self.plans), slot=self.next_slot,
                       head=head, kind=kind)

    def duplicate(self) -> Planned | None:
        """Make the head of an earlier accepted chain available again, while in flight."""
        # Not a chain whose own buffers overlap: its first run may change what the
        # second reads.
        earlier = [p for p in self.plans
                   if p.kind not in REFUSED_KINDS and p.kind != OVERLAPPING]
        if not earlier or not self.slots_left:
            return None
        original = self.rng.choice(earlier)
        original.unreliable = True
        plan = self._plan(original.head, DUPLICATE_HEAD)
        plan.unreliable = True
        return self._ring(original.head, plan)

    def add(self, request: Request, kind: str) -> Planned:
        """Lay out ``request`` as one chain, broken as ``kind`` says (a kind that does not
        fit the request is dropped: the plan then says what the chain really is)."""
        rng = self.rng
        memory = self.memory.data
        if not self.slots_left:
            raise NoRoom
        if kind == WELL_FORMED:
            kind = request.kind
        if kind == HEAD_PAST_TABLE:
            return self._ring(rng.randint(self.size, 0xFFFF), self._plan(-1, kind))

        pieces: list[list[int]] = []
        for data in request.readable:
            address = self.alloc(len(data))
            memory[address:address + len(data)] = data
            pieces.append([address, len(data), 0])
        for length in request.writable:
            pieces.append([self.alloc(length), length, WRITE])
        unreliable = False
        indirect = self.indirect
        use_table = indirect and rng.random() < 0.35

        if kind == ZERO_LENGTH:
            self._pad(pieces, rng.randint(1, 3))
        elif kind == ONLY_ZERO_LENGTH:
            count = rng.randint(1, 3)
            readable = rng.randint(0, count)
            pieces = [[self._any_address(), 0, 0 if i < readable else WRITE]
                      for i in range(count)]
        elif kind == LONGER_THAN_QUEUE:
            if not indirect:
                kind = request.kind
            else:
                use_table = True
                # Just past the queue size, or past the 1024 buffers one readv/writev
                # takes; half the time by cutting the buffers into many small ones.
                wanted = (self.size + rng.randint(1, 8) if rng.random() < 0.9
                          else rng.randint(1025, 1100))
                if rng.random() < 0.5:
                    pieces = _fragment(pieces, wanted)
                self._pad(pieces, wanted - len(pieces))
        elif kind == OVERLAPPING:
            targets = [p for p in pieces if p[2] & WRITE and p[1]]
            others = [p for p in pieces if p[1]]
            if not targets or len(others) < 2:
                kind = request.kind
            else:
                moved = rng.choice(targets)
                over = rng.choice([p for p in others if p is not moved])
                moved[0] = over[0] + rng.randrange(over[1])
                # Within this chain's own data: other chains' buffers stay apart.
                moved[1] = min(moved[1], self.cursor - moved[0])
                unreliable = True
        elif kind == WRONG_DIRECTION:
            boundary = sum(1 for p in pieces if not p[2] & WRITE)
            choices = [b for b in range(len(pieces) + 1) if b != boundary]
            new = rng.choice(choices)
            for i, piece in enumerate(pieces):
                piece[2] = 0 if i < new else WRITE
        elif kind in (OUTSIDE_RAM, ADDRESS_WRAPS, LENGTH_PAST_RAM):
            piece = rng.choice(pieces)
            if kind == OUTSIDE_RAM:
                piece[1] = piece[1] or rng.randint(1, 4096)
                piece[0] = rng.choice((
                    RAM_SIZE - rng.randint(1, piece[1] - 1) if piece[1] > 1 else RAM_SIZE,
                    RAM_SIZE + rng.randrange(1 << 30),
                    rng.randrange(RAM_SIZE, _U64),
                    1 << 63,
                ))
            elif kind == ADDRESS_WRAPS:
                piece[1] = piece[1] or rng.randint(1, (1 << 32) - 1)
                piece[0] = _U64 - rng.randint(1, piece[1])
            else:
                room = RAM_SIZE - piece[0]
                piece[1] = rng.choice((room + rng.randint(1, 4096), 1 << 31, (1 << 32) - 1,
                                       rng.randint(room + 1, (1 << 32) - 1)))
        elif kind == OVER_4GIB:
            if not indirect:
                kind = INDIRECT_NOT_NEGOTIATED
            else:
                pieces = [[0, RAM_SIZE, WRITE] for _ in range((1 << 32) // RAM_SIZE + 1)]
            use_table = True
        elif kind == READABLE_AFTER_WRITABLE:
            first_write = next((i for i, p in enumerate(pieces) if p[2] & WRITE), None)
            if first_write is None:
                length = rng.randint(1, 16)
                pieces.append([self.alloc(length), length, WRITE])
                first_write = len(pieces) - 1
            length = rng.choice((0, rng.randint(1, 64)))
            pieces.insert(rng.randint(first_write + 1, len(pieces)),
                          [self.alloc(length), length, 0])
        elif kind == INDIRECT_NOT_NEGOTIATED or kind in INDIRECT_KINDS:
            if kind != INDIRECT_NOT_NEGOTIATED and not indirect:
                kind = INDIRECT_NOT_NEGOTIATED
            use_table = True

        # Lay the pieces out: in the descriptor table, or in an indirect table whose
        # entries come in any order (the chain starts at entry 0).
        count = len(pieces)
        if use_table:
            table = self.alloc(16 * count)
            order = [0, *rng.sample(range(1, count), count - 1)]
            head = self.take(1)[0]
            head_entry = [table, 16 * count, INDIRECT, rng.getrandbits(16)]
            limit = count
        else:
            order = self.take(count)
            head = order[0]
            head_entry = None
            limit = self.size
        entries = [[address, length, flags | (NEXT if i + 1 < count else 0),
                    order[i + 1] if i + 1 < count else rng.getrandbits(16)]
                   for i, (address, length, flags) in enumerate(pieces)]

        if kind == LOOP:
            entries[-1][2] |= NEXT
            entries[-1][3] = rng.choice(order)
        elif kind == NEXT_PAST_TABLE:
            entries[-1][2] |= NEXT
            entries[-1][3] = rng.randint(limit, 0xFFFF)
        elif kind == UNKNOWN_FLAGS:
            for entry in rng.sample(entries, rng.randint(1, len(entries))):
                entry[2] |= rng.choice((1 << rng.randint(3, 15), rng.getrandbits(16) & 0xFFF8)) or 8
            if head_entry is not None and rng.random() < 0.5:
                # Also WRITE, which the device must ignore on an indirect descriptor.
                head_entry[2] |= rng.choice((WRITE, 1 << rng.randint(3, 15)))
        elif kind == NESTED_INDIRECT:
            entry = rng.choice(entries)
            entry[0], entry[1] = table, 16 * count
            entry[2] = INDIRECT | (entry[2] & NEXT)
        elif kind == INDIRECT_WITH_NEXT:
            head_entry[2] |= NEXT
            head_entry[3] = rng.randrange(self.size)
        elif kind == INDIRECT_BAD_LENGTH:
            head_entry[1] = rng.choice((0, 16 * count + rng.randint(1, 15),
                                        16 * count - rng.randint(1, 15), rng.randint(1, 15)))
        elif kind == INDIRECT_OUTSIDE_RAM:
            length = head_entry[1]
            head_entry[0] = rng.choice((
                RAM_SIZE - rng.randint(1, length - 1), RAM_SIZE + 16 * rng.randrange(1 << 20),
                _U64 - 16 * rng.randint(1, 4), rng.randrange(RAM_SIZE, _U64) & ~15))

        pack = DESCRIPTOR.pack_into
        if head_entry is None:
            addresses = [self.driver.descriptor_table + 16 * index for index in order]
        else:
            addresses = [table + 16 * position for position in order]
            addresses.append(self.driver.descriptor_table + 16 * head)
            entries.append(head_entry)
        for address, entry in zip(addresses, entries, strict=True):
            pack(memory, address, *entry)
        plan = self._plan(head, kind)
        plan.unreliable = unreliable
        plan.descriptors = tuple(addresses)
        return self._ring(head, plan)

    def _pad(self, pieces: list[list[int]], count: int) -> None:
        """Insert ``count`` zero-length buffers anywhere, each in the direction its place
        allows (readable ones before writable ones)."""
        rng = self.rng
        boundary = next((i for i, p in enumerate(pieces) if p[2] & WRITE), len(pieces))
        for _ in range(count):
            position = rng.randint(0, len(pieces))
            readable = position < boundary or (position == boundary and rng.random() < 0.5)
            boundary += readable
            pieces.insert(position, [self._any_address(), 0, 0 if readable else WRITE])

    def _any_address(self) -> int:
        """Where a zero-length buffer points: anywhere at all (nothing may be read there)."""
        rng = self.rng
        return rng.choice((rng.randrange(RAM_SIZE), rng.getrandbits(64), _U64 - 1))


def _fragment(pieces: list[list[int]], wanted: int) -> list[list[int]]:
    """The same bytes in about ``wanted`` buffers (fewer where they are too short)."""
    total = sum(length for _, length, _ in pieces) or 1
    cut: list[list[int]] = []
    for address, length, flags in pieces:
        parts = max(1, min(length, -(-length * wanted // total)))
        bounds = [length * i // parts for i in range(parts + 1)]
        cut.extend([address + a, b - a, flags] for a, b in itertools.pairwise(bounds))
    return cut


def split(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut into 1 to 3 non-empty pieces (fewer when it is shorter)."""
    cuts = sorted(set(rng.sample(range(1, len(data)), min(rng.randint(0, 2), len(data) - 1))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def split_length(rng: random.Random, length: int) -> list[int]:
    """``length`` bytes as 1 to 3 writable buffer sizes, none empty."""
    return [len(piece) for piece in split(rng, bytes(length))]
