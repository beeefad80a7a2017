"""The split virtqueue, device side: ring walking, every rule a hostile driver can
break, u16 wraparound, notification suppression, and a fuzz test that throws random
rings at pop/push and compares the answers with a straightforward reference walker."""

from __future__ import annotations

import dataclasses
import random
import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avmm.memory import MIB, ByteArrayMemory, GuestMemory, MemoryAccess
from avmm.virtio.device import DeviceNeedsReset, serve_queue
from avmm.virtio.queue import (
    MAX_INDIRECT_DESCRIPTORS,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Buffer,
    DescriptorChain,
    QueueError,
    QueueState,
    VirtQueue,
)

from .queue_helpers import DriverQueue, make_queue

NEXT = VIRTQ_DESC_F_NEXT
WRITE = VIRTQ_DESC_F_WRITE
INDIRECT = VIRTQ_DESC_F_INDIRECT


class SparseMemory(MemoryAccess):
    """Claims ``claimed`` bytes of RAM; only the first ``backing`` bytes hold data.
    Enough to build chains of more than 4 GiB without allocating them."""

    def __init__(self, backing: int, claimed: int) -> None:
        self.inner = ByteArrayMemory(backing)
        self.size = backing
        self.claimed = claimed

    def contains(self, address: int, length: int = 1) -> bool:
        return address >= 0 and length >= 0 and address + length <= self.claimed

    def view(self, address: int, length: int) -> memoryview:
        return self.inner.view(address, length)


def pop_one(queue: VirtQueue, driver: DriverQueue) -> DescriptorChain:
    chain = queue.pop(driver.memory)
    assert chain is not None
    return chain


# -- construction, state, reset ----------------------------------------------------------


def test_queue_error_is_device_needs_reset() -> None:
    assert issubclass(QueueError, DeviceNeedsReset)


@pytest.mark.parametrize("max_size", [0, 3, 6, 65536, 32769, -4])
def test_max_size_must_be_power_of_two_up_to_32768(max_size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        VirtQueue(max_size)


def test_initial_state() -> None:
    queue = VirtQueue(256)
    assert queue.state == QueueState(
        max_size=256, size=256, ready=False, descriptor_table=0, available_ring=0,
        used_ring=0, next_available=0, next_used=0, event_idx=False, indirect=False,
        signalled_used=None)


def test_state_is_plain_values() -> None:
    queue, _ = make_queue(8, event_idx=True)
    snapshot = dataclasses.asdict(queue.state)
    assert all(isinstance(v, int | bool | None) for v in snapshot.values())
    assert QueueState(**snapshot) == queue.state


def test_reset_restores_initial_state_in_place() -> None:
    queue, driver = make_queue(8, event_idx=True, start_index=100)
    queue.state.max_size = 16  # as if the device offered more than the driver chose
    state = queue.state
    driver.add_chain([b"x"])
    chain = pop_one(queue, driver)
    queue.push(driver.memory, chain.head, 0)
    queue.should_notify(driver.memory)
    queue.reset()
    assert queue.state is state
    assert state == QueueState(max_size=16)
    assert state.size == 16 and not state.ready and state.signalled_used is None
    assert queue.pop(driver.memory) is None  # not ready


def test_pop_on_a_queue_that_is_not_ready_returns_none() -> None:
    queue, driver = make_queue(8)
    driver.add_chain([b"x"])
    queue.state.ready = False
    assert queue.pop(driver.memory) is None
    assert not queue.should_notify(driver.memory)
    assert not queue.enable_notifications(driver.memory)


# -- validate: size and ring placement ---------------------------------------------------


def test_validate_accepts_the_helper_layout() -> None:
    for event_idx in (False, True):
        queue, driver = make_queue(32, event_idx=event_idx)
        queue.validate(driver.memory)


@pytest.mark.parametrize("size", [0, 3, 12, 64, -1])
def test_validate_rejects_bad_sizes(size: int) -> None:
    queue, driver = make_queue(16, max_size=32)
    queue.state.size = size
    with pytest.raises(QueueError, match=f"queue size {size} "):
        queue.validate(driver.memory)


@pytest.mark.parametrize(("part", "offset", "alignment"), [
    ("descriptor_table", 8, 16), ("descriptor_table", 4, 16),
    ("available_ring", 1, 2), ("used_ring", 2, 4), ("used_ring", 1, 4),
])
def test_validate_rejects_misaligned_parts(part: str, offset: int, alignment: int) -> None:
    queue, driver = make_queue(8)
    setattr(queue.state, part, getattr(queue.state, part) + offset)
    with pytest.raises(QueueError, match=f"{part.replace('_', ' ')} .* {alignment}-byte aligned"):
        queue.validate(driver.memory)


@pytest.mark.parametrize(("part", "length"), [
    ("descriptor_table", 16 * 8), ("available_ring", 4 + 2 * 8), ("used_ring", 4 + 8 * 8)])
def test_validate_checks_each_part_fits_in_ram(part: str, length: int) -> None:
    memory = ByteArrayMemory(0x10000)
    queue, _ = make_queue(8, memory=memory)
    # Exactly at the end of RAM: fine without EVENT_IDX.
    setattr(queue.state, part, 0x10000 - length)
    queue.validate(memory)
    # One alignment step further: out.
    setattr(queue.state, part, 0x10000 - length + 16)
    with pytest.raises(QueueError, match="not inside guest RAM"):
        queue.validate(memory)
    # Far outside, including addresses no RAM could have.
    for address in (0x10_0000, 2**64 - 16):
        setattr(queue.state, part, address)
        with pytest.raises(QueueError, match="not inside guest RAM"):
            queue.validate(memory)


@pytest.mark.parametrize(("part", "length"), [
    ("available_ring", 4 + 2 * 8), ("used_ring", 4 + 8 * 8)])
def test_validate_counts_event_fields_with_event_idx(part: str, length: int) -> None:
    memory = ByteArrayMemory(0x10000)
    queue, _ = make_queue(8, memory=memory, event_idx=True)
    setattr(queue.state, part, 0x10000 - length - 4)
    queue.validate(memory)
    setattr(queue.state, part, 0x10000 - length)
    with pytest.raises(QueueError, match="not inside guest RAM"):
        queue.validate(memory)
    queue.state.event_idx = False
    queue.validate(memory)


def test_validate_rejects_indices_that_are_not_u16() -> None:
    queue, driver = make_queue(8)
    queue.state.next_available = 65536
    with pytest.raises(QueueError, match="next_available"):
        queue.validate(driver.memory)


def test_rings_outside_ram_raise_queue_error_even_without_validate() -> None:
    queue, driver = make_queue(8)
    driver.add_chain([b"x"])
    memory = driver.memory
    for part in ("available_ring", "descriptor_table"):
        saved = getattr(queue.state, part)
        setattr(queue.state, part, 2**40)
        with pytest.raises(QueueError, match="outside guest RAM"):
            queue.pop(memory)
        setattr(queue.state, part, saved)
    chain = pop_one(queue, driver)
    queue.state.used_ring = 2**40
    with pytest.raises(QueueError, match="outside guest RAM"):
        queue.push(memory, chain.head, 0)
    with pytest.raises(QueueError, match="outside guest RAM"):
        queue.disable_notifications(memory)
    with pytest.raises(QueueError, match="outside guest RAM"):
        queue.enable_notifications(memory)
    queue.state.available_ring = 2**40
    queue.state.next_used = 1  # as if a push had gone through
    with pytest.raises(QueueError, match="outside guest RAM"):
        queue.should_notify(memory)


def test_pop_rejects_an_unvalidated_bad_size() -> None:
    queue, driver = make_queue(8)
    driver.add_chain([b"x"])
    queue.state.size = 6
    with pytest.raises(QueueError, match="queue size 6"):
        queue.pop(driver.memory)


def test_layout_and_memory_changes_take_effect_at_once() -> None:
    queue, driver = make_queue(8)
    driver.add_chain([b"first"])
    assert pop_one(queue, driver).read(driver.memory) == b"first"
    # The driver resets and sets the queue up elsewhere, smaller.
    moved = DriverQueue(driver.memory, 4, 0x8000)
    moved.configure(queue)
    moved.add_chain([b"second"])
    assert pop_one(queue, moved).read(driver.memory) == b"second"
    # Another memory object (a restored VM) with the same layout.
    other = ByteArrayMemory(1 << 20)
    again = DriverQueue(other, 4, 0x8000)
    again.add_chain([b"third"])
    queue.state.next_available = queue.state.next_used = 0
    assert pop_one(queue, again).read(other) == b"third"
    # Memory too small for the rings now: an error, not an IndexError.
    with pytest.raises(QueueError, match="available ring outside guest RAM"):
        queue.pop(ByteArrayMemory(0x8000))


def test_state_replaced_on_restore() -> None:
    queue, driver = make_queue(8)
    driver.add_chain([b"a"])
    driver.add_chain([b"b"])
    saved = dataclasses.replace(queue.state)
    assert pop_one(queue, driver).read(driver.memory) == b"a"
    queue.state = saved
    assert pop_one(queue, driver).read(driver.memory) == b"a"
    assert pop_one(queue, driver).read(driver.memory) == b"b"


# -- the basic round trip ----------------------------------------------------------------


def test_empty_ring_pops_none() -> None:
    queue, driver = make_queue(8)
    assert queue.pop(driver.memory) is None
    assert queue.state.next_available == 0


def test_round_trip_mixed_chain() -> None:
    queue, driver = make_queue(8)
    head = driver.add_chain([b"header--", b"payload"], [3, 5])
    chain = pop_one(queue, driver)
    assert chain.head == head
    record = driver.chains[head]
    assert chain.readable == tuple(Buffer(a, n) for a, n in record.readable)
    assert chain.writable == tuple(Buffer(a, n) for a, n in record.writable)
    assert chain.readable_length == 15 and chain.writable_length == 8
    assert chain.read(driver.memory) == b"header--payload"
    assert chain.write(driver.memory, b"status!") == 7
    queue.push(driver.memory, chain.head, 7)
    assert driver.used() == [(head, 7)]
    assert driver.writable_data(head) == b"status!\x00"
    assert queue.state.next_available == 1 and queue.state.next_used == 1
    assert queue.pop(driver.memory) is None


def test_round_trip_on_memfd_guest_memory() -> None:
    with GuestMemory(2 * MIB) as memory:
        queue, driver = make_queue(64, memory=memory, event_idx=True, start_index=65535)
        head = driver.add_chain([b"abc", b"def"], [4, 4], indirect=True)
        chain = pop_one(queue, driver)
        assert chain.read(memory, 2, 3) == b"cde"
        assert chain.write(memory, b"123456", 3) == 5
        queue.push(memory, head, 8)
        assert queue.should_notify(memory)
        assert driver.used() == [(head, 8)]
        assert driver.writable_data(head) == b"\0\0\x0012345"
        driver.set_descriptor(1, 2 * MIB - 4, 8)
        driver.make_available(1)
        with pytest.raises(QueueError, match="not inside guest RAM"):
            queue.pop(memory)
        del chain, queue  # let go of the views before the memory closes


def test_chains_come_out_in_ring_order_and_used_in_push_order() -> None:
    queue, driver = make_queue(8)
    heads = [driver.add_chain(writable=[1]) for _ in range(8)]
    chains = [pop_one(queue, driver) for _ in range(8)]
    assert [c.head for c in chains] == heads
    assert queue.pop(driver.memory) is None
    for chain in reversed(chains):  # out-of-order completion is allowed
        queue.push(driver.memory, chain.head, 1)
    assert driver.used() == [(h, 1) for h in reversed(heads)]


def test_batched_publication_is_one_idx_move() -> None:
    queue, driver = make_queue(8)
    heads = [driver.add_chain([b"a"], publish=False) for _ in range(3)]
    assert queue.pop(driver.memory) is None  # written but not yet published
    driver.publish()
    assert [pop_one(queue, driver).head for _ in range(3)] == heads


def test_full_ring_of_size_entries_is_fine() -> None:
    queue, driver = make_queue(4)
    for _ in range(4):
        driver.add_chain([b"x"])
    assert [pop_one(queue, driver).head for _ in range(4)] == [0, 1, 2, 3]


def test_chain_of_exactly_queue_size_descriptors_is_fine() -> None:
    queue, driver = make_queue(4)
    driver.add_chain([b"a", b"b"], [1, 1])
    chain = pop_one(queue, driver)
    assert len(chain.readable) + len(chain.writable) == 4


def test_zero_length_descriptors_are_skipped() -> None:
    queue, driver = make_queue(8)
    head = driver.add_chain([b"", b"abc", b""], [0, 2, 0])
    chain = pop_one(queue, driver)
    assert chain.head == head
    assert [b.length for b in chain.readable] == [3]
    assert [b.length for b in chain.writable] == [2]


def test_zero_length_descriptor_address_is_not_checked() -> None:
    queue, driver = make_queue(8)
    driver.set_descriptor(0, 2**64 - 1, 0, NEXT, 1)
    driver.set_descriptor(1, driver.data_start, 4, WRITE)
    driver.make_available(0)
    chain = pop_one(queue, driver)
    assert chain.readable == () and chain.writable == (Buffer(driver.data_start, 4),)


def test_only_readable_and_only_writable_chains() -> None:
    queue, driver = make_queue(8)
    driver.add_chain([b"tx frame"])
    driver.add_chain(writable=[64])
    tx, rx = pop_one(queue, driver), pop_one(queue, driver)
    assert tx.writable == () and tx.readable_length == 8
    assert rx.readable == () and rx.writable_length == 64


def test_unknown_flag_bits_are_ignored() -> None:
    queue, driver = make_queue(8)
    driver.set_descriptor(0, driver.data_start, 4, 0xFFF8 | NEXT, 1)
    driver.set_descriptor(1, driver.data_start + 16, 4, 0xFFF8 | WRITE)
    driver.make_available(0)
    chain = pop_one(queue, driver)
    assert len(chain.readable) == 1 and len(chain.writable) == 1


def test_next_is_ignored_without_the_next_flag() -> None:
    queue, driver = make_queue(8)
    driver.set_descriptor(0, driver.data_start, 4, 0, 0xFFFF)
    driver.make_available(0)
    assert pop_one(queue, driver).readable == (Buffer(driver.data_start, 4),)


# -- hostile rings: each raises QueueError naming the problem ----------------------------


def assert_pop_fails(queue: VirtQueue, driver: DriverQueue, match: str) -> None:
    before = dataclasses.replace(queue.state)
    with pytest.raises(QueueError, match=match):
        queue.pop(driver.memory)
    assert queue.state == before, "a failed pop must not move the device's position"


@pytest.mark.parametrize("ahead", [9, 100, 0x8000, 0xFFFF])
def test_avail_idx_more_than_size_ahead(ahead: int) -> None:
    queue, driver = make_queue(8, start_index=65530)
    driver.set_avail_idx(65530 + ahead)
    assert_pop_fails(queue, driver, f"{ahead} entries ahead .* queue size 8")


def test_avail_idx_moving_backwards_is_far_ahead() -> None:
    queue, driver = make_queue(8, start_index=5)
    driver.set_avail_idx(4)  # a decrement reads as 65535 ahead
    assert_pop_fails(queue, driver, "65535 entries ahead")


@pytest.mark.parametrize("head", [8, 9, 0xFFFF])
def test_head_index_past_the_table(head: int) -> None:
    queue, driver = make_queue(8)
    driver.make_available(head)
    assert_pop_fails(queue, driver, f"head descriptor {head}, past the end")


@pytest.mark.parametrize("next_index", [8, 0x8000, 0xFFFF])
def test_next_index_past_the_table(next_index: int) -> None:
    queue, driver = make_queue(8)
    driver.set_descriptor(0, driver.data_start, 4, NEXT, next_index)
    driver.make_available(0)
    assert_pop_fails(queue, driver, f"descriptor 0: next index {next_index} is past the end")


@pytest.mark.parametrize("links", [[0], [1, 0], [1, 2, 3, 1], [1, 2, 3, 4, 5, 6, 7, 0]])
def test_looping_chains(links: list[int]) -> None:
    queue, driver = make_queue(8)
    index = 0
    for following in links:
        driver.set_descriptor(index, driver.data_start, 1, NEXT, following)
        index = following
    driver.make_available(0)
    assert_pop_fails(queue, driver, "more than the 8 descriptors .* loop")


def test_looping_chain_of_zero_length_descriptors() -> None:
    queue, driver = make_queue(2)
    driver.set_descriptor(0, 0, 0, NEXT, 1)
    driver.set_descriptor(1, 0, 0, NEXT, 0)
    driver.make_available(1)
    assert_pop_fails(queue, driver, "loop")


@pytest.mark.parametrize(("address", "length"), [
    (1 << 20, 1),            # just past the end of RAM
    ((1 << 20) - 4, 8),      # straddles the end
    (2**64 - 1, 2),          # wraps a 64-bit address
    (0, 2**32 - 1),          # longer than RAM
])
def test_buffer_outside_ram(address: int, length: int) -> None:
    queue, driver = make_queue(8)
    driver.set_descriptor(0, driver.data_start, 4, NEXT, 1)
    driver.set_descriptor(1, address, length, WRITE)
    driver.make_available(0)
    assert_pop_fails(queue, driver, f"descriptor 1: buffer 0x{address:x}.* not inside guest RAM")


def test_buffer_ending_exactly_at_the_end_of_ram_is_fine() -> None:
    queue, driver = make_queue(8)
    driver.set_descriptor(0, (1 << 20) - 8, 8, WRITE)
    driver.make_available(0)
    assert pop_one(queue, driver).writable == (Buffer((1 << 20) - 8, 8),)


def test_readable_after_writable() -> None:
    queue, driver = make_queue(8)
    driver.set_descriptor(0, driver.data_start, 4, NEXT, 1)
    driver.set_descriptor(1, driver.data_start, 4, NEXT | WRITE, 2)
    driver.set_descriptor(2, driver.data_start, 4, 0)
    driver.make_available(0)
    assert_pop_fails(queue, driver, "descriptor 2: device-readable descriptor after a "
                                    "device-writable one")


def test_zero_length_readable_after_writable_still_breaks_the_order() -> None:
    queue, driver = make_queue(8)
    driver.set_descriptor(0, driver.data_start, 4, NEXT | WRITE, 1)
    driver.set_descriptor(1, driver.data_start, 0, 0)
    driver.make_available(0)
    assert_pop_fails(queue, driver, "readable descriptor after")


def test_total_length_cap() -> None:
    memory = SparseMemory(1 << 20, claimed=1 << 40)
    queue, driver = make_queue(8, memory=memory)
    # Exactly 2^32 bytes is allowed ...
    driver.set_descriptor(0, 0x10000, 2**32 - 1, NEXT, 1)
    driver.set_descriptor(1, 0x10000, 1, WRITE)
    driver.make_available(0)
    chain = pop_one(queue, driver)
    assert chain.readable_length + chain.writable_length == 2**32
    # ... one more byte is not.
    driver.set_descriptor(2, 0x10000, 2**32 - 1, NEXT, 3)
    driver.set_descriptor(3, 0x10000, 2, WRITE)
    driver.make_available(2)
    assert_pop_fails(queue, driver, "chain 2, descriptor 3: chain describes more than 2\\^32")


def test_total_length_cap_across_an_indirect_table() -> None:
    memory = SparseMemory(1 << 20, claimed=1 << 40)
    queue, driver = make_queue(8, memory=memory)
    table = driver.alloc_data(32)
    memory.write(table, driver.pack_descriptors([
        (0x10000, 2**31, NEXT, 1), (0x10000, 2**31, WRITE | NEXT, 2)]))
    memory.write(table + 32, driver.pack_descriptors([(0x10000, 1, WRITE, 0)]))
    driver.set_descriptor(0, 0x10000, 1, NEXT, 1)
    driver.set_descriptor(1, table, 48, INDIRECT)
    driver.make_available(0)
    assert_pop_fails(queue, driver, "indirect table .* entry 1: chain describes more")


# -- indirect descriptors ----------------------------------------------------------------


def test_indirect_chain_round_trip() -> None:
    queue, driver = make_queue(4)
    head = driver.add_chain([b"12345", b"678"], [2, 2, 2, 2, 2], indirect=True)
    chain = pop_one(queue, driver)
    assert chain.head == head
    assert chain.read(driver.memory) == b"12345678"
    assert len(chain.writable) == 5  # longer than the queue size: fine inside a table
    assert chain.write(driver.memory, b"abcdefghijkl") == 10
    queue.push(driver.memory, head, 10)
    assert driver.used() == [(head, 10)]
    assert driver.writable_data(head) == b"abcdefghij"


def test_indirect_not_negotiated() -> None:
    queue, driver = make_queue(8, indirect=False)
    driver.add_chain([b"x"], indirect=True)
    assert_pop_fails(queue, driver, "VIRTIO_F_INDIRECT_DESC was not negotiated")


def test_indirect_with_next() -> None:
    queue, driver = make_queue(8)
    head = driver.add_chain([b"x"], indirect=True)
    address, length, _, _ = driver.descriptor(head)
    driver.set_descriptor(head, address, length, INDIRECT | NEXT, head)
    assert_pop_fails(queue, driver, "both INDIRECT and NEXT")


def test_indirect_inside_indirect() -> None:
    queue, driver = make_queue(8)
    inner = driver.alloc_data(16)
    driver.memory.write(inner, driver.pack_descriptors([(driver.data_start, 1, 0, 0)]))
    outer = driver.alloc_data(32)
    driver.memory.write(outer, driver.pack_descriptors([
        (driver.data_start, 1, NEXT, 1), (inner, 16, INDIRECT, 0)]))
    driver.set_descriptor(0, outer, 32, INDIRECT)
    driver.make_available(0)
    assert_pop_fails(queue, driver, f"indirect table at 0x{outer:x}, entry 1: INDIRECT flag "
                                    "set inside an indirect table")


@pytest.mark.parametrize("length", [0, 8, 17, 31])
def test_indirect_table_length_must_be_a_nonzero_multiple_of_16(length: int) -> None:
    queue, driver = make_queue(8)
    driver.set_descriptor(0, driver.data_start, length, INDIRECT)
    driver.make_available(0)
    assert_pop_fails(queue, driver, f"indirect table length {length} is not a non-zero "
                                    "multiple of 16")


def test_indirect_table_outside_ram() -> None:
    queue, driver = make_queue(8)
    driver.set_descriptor(0, (1 << 20) - 16, 32, INDIRECT)
    driver.make_available(0)
    assert_pop_fails(queue, driver, "indirect table at 0xffff0 \\(32 bytes\\) is not inside")


def test_indirect_table_over_the_limit() -> None:
    queue, driver = make_queue(8, memory_size=1 << 24)
    length = 16 * (MAX_INDIRECT_DESCRIPTORS + 1)
    driver.set_descriptor(0, driver.data_start, length, INDIRECT)
    driver.make_available(0)
    assert_pop_fails(queue, driver, "exceeds the limit")


def test_indirect_loop_and_next_past_the_table() -> None:
    queue, driver = make_queue(8)
    table = driver.alloc_data(48)
    data = driver.data_start
    driver.memory.write(table, driver.pack_descriptors([
        (data, 1, NEXT, 1), (data, 1, NEXT, 2), (data, 1, NEXT, 0)]))
    driver.set_descriptor(0, table, 48, INDIRECT)
    driver.make_available(0)
    assert_pop_fails(queue, driver, "more than the 3 descriptors its table holds")
    # A next index valid in the main table but past this 3-entry table.
    driver.memory.write(table + 32, driver.pack_descriptors([(data, 1, NEXT, 3)]))
    assert_pop_fails(queue, driver, "entry 2: next index 3 is past the end of the 3-entry")


def test_indirect_descriptor_write_flag_is_ignored() -> None:
    queue, driver = make_queue(8)
    head = driver.add_chain([b"read me"], [4], indirect=True)
    address, length, _, _ = driver.descriptor(head)
    driver.set_descriptor(head, address, length, INDIRECT | WRITE)
    chain = pop_one(queue, driver)
    assert chain.read(driver.memory) == b"read me" and chain.writable_length == 4


def test_direct_descriptors_followed_by_an_indirect_table() -> None:
    queue, driver = make_queue(8)
    memory = driver.memory
    header = driver.alloc_data(4)
    memory.write(header, b"head")
    body = driver.alloc_data(4)
    memory.write(body, b"body")
    status = driver.alloc_data(1)
    table = driver.alloc_data(32)
    memory.write(table, driver.pack_descriptors([
        (body, 4, NEXT, 1), (status, 1, WRITE, 0)]))
    driver.set_descriptor(3, header, 4, NEXT, 5)
    driver.set_descriptor(5, table, 32, INDIRECT)
    driver.make_available(3)
    chain = pop_one(queue, driver)
    assert chain.head == 3
    assert chain.read(memory) == b"headbody"
    assert chain.writable == (Buffer(status, 1),)


def test_order_rule_spans_direct_and_indirect_parts() -> None:
    queue, driver = make_queue(8)
    table = driver.alloc_data(16)
    driver.memory.write(table, driver.pack_descriptors([(driver.data_start, 4, 0, 0)]))
    driver.set_descriptor(0, driver.data_start, 4, WRITE | NEXT, 1)
    driver.set_descriptor(1, table, 16, INDIRECT)
    driver.make_available(0)
    assert_pop_fails(queue, driver, "entry 0: device-readable descriptor after")


def test_indirect_buffer_outside_ram() -> None:
    queue, driver = make_queue(8)
    table = driver.alloc_data(16)
    driver.memory.write(table, driver.pack_descriptors([(2**63, 4, 0, 0)]))
    driver.set_descriptor(0, table, 16, INDIRECT)
    driver.make_available(0)
    assert_pop_fails(queue, driver, "entry 0: buffer 0x8000000000000000.*not inside guest RAM")


# -- u16 wraparound ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 4, 256])
def test_indices_wrap_at_65536(size: int) -> None:
    queue, driver = make_queue(size, start_index=65536 - 2 * size - 1)
    seen = []
    for round_ in range(5 * size):
        head = driver.add_chain([round_.to_bytes(2, "little")], [2], indirect=size == 1)
        chain = pop_one(queue, driver)
        assert chain.head == head
        assert chain.read(driver.memory) == round_.to_bytes(2, "little")
        chain.write(driver.memory, b"ok")
        queue.push(driver.memory, chain.head, 2)
        seen += driver.used()
    assert seen == [(h, 2) for h, _ in seen] and len(seen) == 5 * size
    end = (65536 - 2 * size - 1 + 5 * size) & 0xFFFF
    assert queue.state.next_available == queue.state.next_used == end
    assert driver.used_idx == driver.avail_idx == end


def test_full_ring_across_the_wrap() -> None:
    queue, driver = make_queue(8, start_index=65532)
    heads = [driver.add_chain([b"x"]) for _ in range(8)]
    assert driver.avail_idx == 4
    assert [pop_one(queue, driver).head for _ in range(8)] == heads
    assert queue.pop(driver.memory) is None


# -- the used ring -----------------------------------------------------------------------


def test_push_writes_element_then_idx() -> None:
    queue, driver = make_queue(4, start_index=2)
    for _ in range(3):
        driver.add_chain(writable=[8])
    chains = [pop_one(queue, driver) for _ in range(3)]
    for i, chain in enumerate(chains):
        queue.push(driver.memory, chain.head, i + 5)
    # Slots 2, 3, 0 (the ring wrapped at size 4).
    assert [driver.used_element(s) for s in (2, 3, 0)] == [
        (c.head, i + 5) for i, c in enumerate(chains)]
    assert driver.used_idx == 5


@pytest.mark.parametrize("head", [-1, 8, 65536])
def test_push_rejects_heads_outside_the_table(head: int) -> None:
    queue, driver = make_queue(8)
    driver.add_chain([b"x"])
    pop_one(queue, driver)
    with pytest.raises(QueueError, match="not below the queue size"):
        queue.push(driver.memory, head, 0)
    assert driver.used_idx == 0


@pytest.mark.parametrize("written", [-1, 2**32])
def test_push_rejects_lengths_that_do_not_fit_u32(written: int) -> None:
    queue, driver = make_queue(8)
    driver.add_chain([b"x"])
    chain = pop_one(queue, driver)
    with pytest.raises(QueueError, match="does not fit in u32"):
        queue.push(driver.memory, chain.head, written)


def test_push_rejects_more_chains_than_were_taken() -> None:
    queue, driver = make_queue(8)
    driver.add_chain([b"x"])
    chain = pop_one(queue, driver)
    queue.push(driver.memory, chain.head, 0)
    with pytest.raises(QueueError, match=r"every chain taken .* was returned already"):
        queue.push(driver.memory, chain.head, 0)
    assert driver.used_idx == 1


def test_push_on_a_queue_that_is_not_ready() -> None:
    queue, driver = make_queue(8)
    driver.add_chain([b"x"])
    chain = pop_one(queue, driver)
    queue.state.ready = False
    with pytest.raises(QueueError, match="not ready"):
        queue.push(driver.memory, chain.head, 0)


# -- gather / scatter --------------------------------------------------------------------


@pytest.fixture
def scattered() -> tuple[DescriptorChain, ByteArrayMemory]:
    queue, driver = make_queue(8)
    driver.add_chain([b"abc", b"", b"defgh", b"ij"], [2, 0, 3, 4])
    chain = pop_one(queue, driver)
    assert isinstance(driver.memory, ByteArrayMemory)
    return chain, driver.memory


@pytest.mark.parametrize(("offset", "length", "expected"), [
    (0, None, b"abcdefghij"), (0, 3, b"abc"), (2, 2, b"cd"), (3, 5, b"defgh"),
    (1, 9, b"bcdefghij"), (7, None, b"hij"), (10, None, b""), (15, None, b""),
    (10, 0, b""), (4, 0, b""), (9, 1, b"j"),
])
def test_read_gathers_across_buffers(scattered: tuple[DescriptorChain, ByteArrayMemory],
                                     offset: int, length: int | None,
                                     expected: bytes) -> None:
    chain, memory = scattered
    data = chain.read(memory, offset, length)
    assert data == expected and type(data) is bytes


@pytest.mark.parametrize(("offset", "length"), [(0, 11), (9, 2), (11, 0), (20, 1)])
def test_read_past_the_readable_bytes(scattered: tuple[DescriptorChain, ByteArrayMemory],
                                      offset: int, length: int) -> None:
    chain, memory = scattered
    with pytest.raises(QueueError, match="only 10 readable bytes"):
        chain.read(memory, offset, length)


def test_read_and_write_reject_negative_arguments(
        scattered: tuple[DescriptorChain, ByteArrayMemory]) -> None:
    chain, memory = scattered
    with pytest.raises(ValueError):
        chain.read(memory, -1)
    with pytest.raises(ValueError):
        chain.read(memory, 0, -1)
    with pytest.raises(ValueError):
        chain.write(memory, b"x", -1)


@pytest.mark.parametrize(("offset", "data", "written", "expected"), [
    (0, b"123456789", 9, b"123456789"),
    (0, b"1234567890XYZ", 9, b"123456789"),
    (1, b"abcd", 4, b"\0abcd\0\0\0\0"),
    (2, b"abc", 3, b"\0\0abc\0\0\0\0"),
    (5, b"abcdefgh", 4, b"\0\0\0\0\0abcd"),
    (9, b"abc", 0, b"\0" * 9),
    (100, b"abc", 0, b"\0" * 9),
    (3, b"", 0, b"\0" * 9),
])
def test_write_scatters_across_buffers(scattered: tuple[DescriptorChain, ByteArrayMemory],
                                       offset: int, data: bytes, written: int,
                                       expected: bytes) -> None:
    chain, memory = scattered
    assert chain.write(memory, data, offset) == written
    assert b"".join(memory.read(a, n) for a, n in chain.writable) == expected


def test_write_accepts_memoryviews_and_bytearrays(
        scattered: tuple[DescriptorChain, ByteArrayMemory]) -> None:
    chain, memory = scattered
    assert chain.write(memory, memoryview(bytearray(b"xy"))) == 2
    assert chain.write(memory, bytearray(b"z"), 2) == 1
    assert memory.read(chain.writable[0].address, 2) == b"xy"
    assert memory.read(chain.writable[1].address, 1) == b"z"


def test_readable_buffers_are_never_written(
        scattered: tuple[DescriptorChain, ByteArrayMemory]) -> None:
    chain, memory = scattered
    chain.write(memory, b"\xff" * 100)
    assert chain.read(memory) == b"abcdefghij"


# -- used buffer notifications -----------------------------------------------------------


def push_n(queue: VirtQueue, driver: DriverQueue, count: int) -> None:
    for _ in range(count):
        driver.used()  # reclaim descriptors (and, with driver.event_idx, re-arm used_event)
        driver.add_chain(writable=[1])
        queue.push(driver.memory, pop_one(queue, driver).head, 1)


def test_no_event_idx_notifies_unless_no_interrupt() -> None:
    queue, driver = make_queue(8)
    push_n(queue, driver, 1)
    assert queue.should_notify(driver.memory)
    assert not queue.should_notify(driver.memory)  # nothing new since
    driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    push_n(queue, driver, 2)
    assert not queue.should_notify(driver.memory)
    driver.set_avail_flags(0)
    push_n(queue, driver, 1)
    assert queue.should_notify(driver.memory)
    assert queue.state.signalled_used == 4


def test_event_idx_ignores_the_no_interrupt_flag() -> None:
    queue, driver = make_queue(8, event_idx=True)
    driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    driver.set_used_event(0)
    push_n(queue, driver, 1)
    assert queue.should_notify(driver.memory)


def test_event_idx_notifies_when_used_event_is_crossed() -> None:
    queue, driver = make_queue(8, event_idx=True)
    driver.event_idx = False  # drive used_event by hand
    push_n(queue, driver, 1)
    assert queue.should_notify(driver.memory)  # first look: always
    driver.set_used_event(3)  # "interrupt me when entry 3 is used" (used idx reaches 4)
    push_n(queue, driver, 1)  # entry 1
    assert not queue.should_notify(driver.memory)
    push_n(queue, driver, 1)  # entry 2
    assert not queue.should_notify(driver.memory)
    push_n(queue, driver, 2)  # entries 3 and 4
    assert queue.should_notify(driver.memory)
    push_n(queue, driver, 3)  # entries 5..7: used_event 3 is behind us
    assert not queue.should_notify(driver.memory)


def test_event_idx_with_wraparound() -> None:
    queue, driver = make_queue(8, event_idx=True, start_index=65533)
    driver.event_idx = False
    queue.state.signalled_used = 65533
    driver.set_used_event(1)
    push_n(queue, driver, 3)  # entries 65533, 65534, 65535
    assert not queue.should_notify(driver.memory)
    push_n(queue, driver, 2)  # entries 0, 1
    assert queue.should_notify(driver.memory)
    assert queue.state.signalled_used == 2
    driver.set_used_event(65535)  # far behind: only after another wrap
    push_n(queue, driver, 5)
    assert not queue.should_notify(driver.memory)


@given(old=st.integers(0, 0xFFFF), count=st.integers(1, 0x8000),
       used_event=st.integers(0, 0xFFFF))
@settings(max_examples=300, deadline=None)
def test_event_idx_decision_matches_the_spec(old: int, count: int, used_event: int) -> None:
    # The spec: notify iff one of the entries written since the last look was placed at
    # index used_event, i.e. used_event is in [old, old + count) modulo 2^16.
    queue = VirtQueue(8)
    memory = ByteArrayMemory(0x1000)
    s = queue.state
    s.ready, s.event_idx, s.available_ring = True, True, 0x100
    s.signalled_used = old
    s.next_used = (old + count) & 0xFFFF
    memory.write_u16(0x100 + 4 + 2 * 8, used_event)
    expected = (used_event - old) & 0xFFFF < count
    assert queue.should_notify(memory) == expected


def test_helper_driver_with_event_idx_gets_one_interrupt_per_batch() -> None:
    queue, driver = make_queue(8, event_idx=True)
    driver.set_used_event(0)
    for _ in range(3):
        driver.add_chain(writable=[1])
    for _ in range(3):
        queue.push(driver.memory, pop_one(queue, driver).head, 1)
    assert queue.should_notify(driver.memory)
    assert len(driver.used()) == 3  # re-arms used_event at 3
    push_n(queue, driver, 1)
    assert queue.should_notify(driver.memory)


# -- available buffer notifications ------------------------------------------------------


def test_disable_and_enable_without_event_idx() -> None:
    queue, driver = make_queue(8)
    queue.disable_notifications(driver.memory)
    assert driver.used_flags == VIRTQ_USED_F_NO_NOTIFY
    old = driver.avail_idx
    driver.add_chain([b"x"])
    assert not driver.needs_kick(old)
    assert pop_one(queue, driver)
    assert not queue.enable_notifications(driver.memory)
    assert driver.used_flags == 0
    old = driver.avail_idx
    driver.add_chain([b"y"])
    assert driver.needs_kick(old)


def test_enable_reports_buffers_that_raced_in_without_event_idx() -> None:
    queue, driver = make_queue(8)
    queue.disable_notifications(driver.memory)
    assert queue.pop(driver.memory) is None  # drained
    driver.add_chain([b"late"])  # the driver sees NO_NOTIFY and does not kick
    assert queue.enable_notifications(driver.memory)  # so the device must look again
    assert pop_one(queue, driver).read(driver.memory) == b"late"
    assert not queue.enable_notifications(driver.memory)


def test_disable_and_enable_with_event_idx() -> None:
    queue, driver = make_queue(8, event_idx=True, start_index=65534)
    queue.disable_notifications(driver.memory)
    assert driver.used_flags == 0  # the device MUST keep flags at 0 with EVENT_IDX
    assert not queue.enable_notifications(driver.memory)
    assert driver.avail_event == 65534
    old = driver.avail_idx
    driver.add_chain([b"a"])
    assert driver.needs_kick(old)
    queue.disable_notifications(driver.memory)
    pop_one(queue, driver)
    old = driver.avail_idx
    driver.add_chain([b"b"])  # avail_event stayed at 65534: no kick needed
    assert not driver.needs_kick(old)
    assert queue.enable_notifications(driver.memory)  # raced in
    assert driver.avail_event == 65535
    pop_one(queue, driver)
    assert not queue.enable_notifications(driver.memory)
    assert driver.avail_event == 0


# -- the device loop in device.py, driven by this queue ----------------------------------


class FakeContext:
    def __init__(self, queue: VirtQueue, memory: MemoryAccess) -> None:
        self.memory = memory
        self.queues = [queue]
        self.features = 0
        self.kicks = trio.Semaphore(0)
        self.signals = 0

    async def wait_kick(self, queue_index: int) -> None:
        await self.kicks.acquire()

    def signal_used(self, queue_index: int) -> None:
        if self.queues[queue_index].should_notify(self.memory):
            self.signals += 1

    def signal_config_change(self) -> None:
        pass


@pytest.mark.parametrize("event_idx", [False, True])
async def test_serve_queue_echo(event_idx: bool) -> None:
    queue, driver = make_queue(16, event_idx=event_idx, start_index=65530)
    memory = driver.memory
    context = FakeContext(queue, memory)

    async def echo(chain: DescriptorChain) -> int:
        await trio.lowlevel.checkpoint()
        return chain.write(memory, chain.read(memory)[::-1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_queue, context, 0, echo)
        heads = {driver.add_chain([bytes([i, i + 1])], [2]): i for i in range(6)}
        context.kicks.release()
        await trio.testing.wait_all_tasks_blocked()
        used = driver.used()
        assert sorted(h for h, _ in used) == sorted(heads)
        for head, length in used:
            i = heads[head]
            assert length == 2 and driver.writable_data(head) == bytes([i + 1, i])
        assert context.signals == 1
        nursery.cancel_scope.cancel()


# -- fuzz: random and hostile rings against a reference walker ---------------------------
#
# Hypothesis draws the queue size and a seed; everything else comes from
# random.Random(seed), because each Hypothesis draw costs ~0.2 ms here (hundreds of fields
# took ~40 ms an example) and the run must reach 10,000 examples in seconds. A failure
# reports the size and the seed, which reproduce it exactly.

FUZZ_MEMORY = 0x2000
FUZZ_TABLE, FUZZ_AVAIL, FUZZ_USED = 0x0, 0x200, 0x300  # room for size 16, event fields
FUZZ_DATA = 0x400  # buffers of valid chains: FUZZ_DATA..FUZZ_INDIRECT
FUZZ_INDIRECT = 0x1000  # a 16-entry scratch area for indirect tables
FUZZ_SCRATCH = 16
FUZZ_EXAMPLES = 10_000

_ODD_ADDRESSES = (0, FUZZ_INDIRECT, FUZZ_INDIRECT + 16, FUZZ_INDIRECT + 64, FUZZ_MEMORY - 16,
                  FUZZ_MEMORY - 1, FUZZ_MEMORY, 2**63, 2**64 - 16, 2**64 - 1)
_ODD_LENGTHS = (0, 1, 16, 32, 64, 256, 17, FUZZ_MEMORY, 2**31, 2**32 - 16, 2**32 - 1)

Descriptor = tuple[int, int, int, int]


def random_descriptor(rng: random.Random, size: int) -> Descriptor:
    """Anything at all, biased towards values near the limits."""
    r = rng.random()
    address = (rng.randrange(FUZZ_DATA, FUZZ_MEMORY) if r < 0.6
               else rng.choice(_ODD_ADDRESSES) if r < 0.85 else rng.getrandbits(64))
    r = rng.random()
    length = (rng.randrange(49) if r < 0.6
              else rng.choice(_ODD_LENGTHS) if r < 0.9 else rng.getrandbits(32))
    flags = rng.randrange(8) if rng.random() < 0.85 else rng.getrandbits(16)
    following = rng.randrange(size + 2) if rng.random() < 0.85 else rng.getrandbits(16)
    return address, length, flags, following


def corrupt(rng: random.Random, descriptor: Descriptor, size: int) -> Descriptor:
    """One field of ``descriptor`` replaced by something random or hostile."""
    fields_ = list(descriptor)
    field_ = rng.randrange(4)
    fields_[field_] = random_descriptor(rng, size)[field_]
    if field_ == 2 and rng.random() < 0.5:  # or just flip one meaningful flag
        fields_[2] = descriptor[2] ^ rng.choice((NEXT, WRITE, INDIRECT))
    return fields_[0], fields_[1], fields_[2], fields_[3]


def build_valid_ring(rng: random.Random, size: int, indirect: bool
                     ) -> tuple[list[Descriptor], list[Descriptor], list[int]]:
    """A well-formed descriptor table, scratch area and list of heads."""
    table: list[Descriptor] = [random_descriptor(rng, size) for _ in range(size)]
    scratch: list[Descriptor] = [random_descriptor(rng, size) for _ in range(FUZZ_SCRATCH)]
    free = list(range(size))
    rng.shuffle(free)
    scratch_used = 0
    heads = []
    while free and rng.random() < 0.85:
        direct = rng.randint(1, min(len(free), 4))
        via_table = indirect and scratch_used < FUZZ_SCRATCH and rng.random() < 0.3
        in_table = rng.randint(1, FUZZ_SCRATCH - scratch_used) if via_table else 0
        buffers = direct - via_table + in_table
        readable = rng.randint(0, buffers)
        kinds = [0] * readable + [WRITE] * (buffers - readable)
        data = [(rng.randrange(FUZZ_DATA, FUZZ_INDIRECT - 64), rng.randrange(64), kind)
                for kind in kinds]
        indices = [free.pop() for _ in range(direct)]
        for i, index in enumerate(indices):
            last = i == direct - 1
            if last and via_table:
                start = FUZZ_INDIRECT + 16 * scratch_used
                table[index] = (start, 16 * in_table, INDIRECT | rng.choice((0, WRITE)), 0)
                order = list(range(in_table))
                rng.shuffle(order)
                for j, slot in enumerate(order):
                    address, length, kind = data[direct - 1 + j]
                    more = j + 1 < in_table
                    scratch[scratch_used + slot] = (
                        address, length, kind | (NEXT if more else 0),
                        order[j + 1] if more else rng.getrandbits(16))
                scratch_used += in_table
            else:
                address, length, kind = data[i]
                table[index] = (address, length, kind | (0 if last else NEXT),
                                rng.getrandbits(16) if last else indices[i + 1])
        heads.append(indices[0])
    return table, scratch, heads


def reference_pop(memory: ByteArrayMemory, s: QueueState
                  ) -> str | tuple[int, list[Buffer], list[Buffer]] | None:
    """The rules of virtio 1.2 §2.7, written as plainly as possible: None (empty),
    "error", or (head, readable, writable)."""
    available_idx = memory.read_u16(s.available_ring + 2)
    pending = (available_idx - s.next_available) % 65536
    if pending == 0:
        return None
    if pending > s.size:
        return "error"
    head = memory.read_u16(s.available_ring + 4 + 2 * (s.next_available % s.size))
    if head >= s.size:
        return "error"

    def descriptors(table: int, count: int, first: int):
        index, seen = first, set()
        while True:
            if index in seen:
                yield None  # loop
                return
            seen.add(index)
            address, length, flags, following = struct.unpack(
                "<QIHH", memory.read(table + 16 * index, 16))
            yield address, length, flags
            if not flags & NEXT:
                return
            if following >= count:
                yield None
                return
            index = following

    readable: list[Buffer] = []
    writable: list[Buffer] = []
    total = 0
    seen_write = False
    walk = descriptors(s.descriptor_table, s.size, head)
    nested = False
    while walk is not None:
        current, walk = walk, None
        for item in current:
            if item is None:
                return "error"
            address, length, flags = item
            if flags & INDIRECT:
                if (not s.indirect or nested or flags & NEXT or length == 0
                        or length % 16 or length // 16 > MAX_INDIRECT_DESCRIPTORS
                        or not memory.contains(address, length)):
                    return "error"
                nested = True
                walk = descriptors(address, length // 16, 0)
                break
            if length and not memory.contains(address, length):
                return "error"
            total += length
            if total > 2**32:
                return "error"
            if flags & WRITE:
                seen_write = True
                if length:
                    writable.append(Buffer(address, length))
            else:
                if seen_write:
                    return "error"
                if length:
                    readable.append(Buffer(address, length))
    return head, readable, writable


@given(size=st.sampled_from([1, 2, 4, 8, 16]), seed=st.integers(0, 2**64 - 1))
@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_hostile_rings(size: int, seed: int) -> None:
    rng = random.Random(seed)
    next_available = rng.choice((rng.getrandbits(16), 0xFFFF - rng.randrange(16)))
    event_idx = rng.random() < 0.5
    indirect = rng.random() < 0.7
    mutations = rng.randint(-1, 4)  # -1: every descriptor random; else corrupt a valid ring
    if mutations < 0:
        table = [random_descriptor(rng, size) for _ in range(size)]
        scratch = [random_descriptor(rng, size) for _ in range(FUZZ_SCRATCH)]
        heads = [rng.randrange(size + 1) for _ in range(rng.randrange(size + 1))]
        pending = len(heads) if rng.random() < 0.8 else rng.getrandbits(16)
    else:
        table, scratch, heads = build_valid_ring(rng, size, indirect)
        pending = len(heads)
        heads += [rng.randrange(size) for _ in range(size - len(heads))]
        for _ in range(mutations):
            target = rng.random()
            if target < 0.5:
                index = rng.randrange(size)
                table[index] = corrupt(rng, table[index], size)
            elif target < 0.8:
                index = rng.randrange(FUZZ_SCRATCH)
                scratch[index] = corrupt(rng, scratch[index], size)
            elif target < 0.9:
                heads[rng.randrange(size)] = rng.choice((size, size - 1, rng.getrandbits(16)))
            else:
                pending = rng.choice((size, size + 1, 0xFFFF, rng.getrandbits(16)))

    memory = ByteArrayMemory(FUZZ_MEMORY)
    pack = struct.Struct("<QIHH").pack_into
    for i, descriptor in enumerate(table):
        pack(memory.data, FUZZ_TABLE + 16 * i, *descriptor)
    for i, descriptor in enumerate(scratch):
        pack(memory.data, FUZZ_INDIRECT + 16 * i, *descriptor)
    for i, head in enumerate(heads[:size]):
        memory.write_u16(FUZZ_AVAIL + 4 + 2 * ((next_available + i) % size), head)
    memory.write_u16(FUZZ_AVAIL + 2, (next_available + pending) & 0xFFFF)
    memory.write_u16(FUZZ_USED + 2, next_available)

    queue = VirtQueue(16)
    s = queue.state
    s.size, s.ready, s.event_idx, s.indirect = size, True, event_idx, indirect
    s.descriptor_table, s.available_ring, s.used_ring = FUZZ_TABLE, FUZZ_AVAIL, FUZZ_USED
    s.next_available = s.next_used = next_available
    queue.validate(memory)

    for _ in range(size + 1):
        before = dataclasses.replace(s)
        expected = reference_pop(memory, s)
        try:
            chain = queue.pop(memory)
        except QueueError as e:
            assert expected == "error", f"pop raised {e}, reference says {expected}"
            assert str(e)
            assert s == before
            break
        if chain is None:
            assert expected is None
            assert s == before
            break
        assert expected == (chain.head, list(chain.readable), list(chain.writable))
        # The invariants, checked directly as well.
        buffers = chain.readable + chain.writable
        assert all(b.length > 0 and memory.contains(b.address, b.length) for b in buffers)
        assert chain.readable_length + chain.writable_length <= 2**32
        assert len(buffers) <= size + FUZZ_MEMORY // 16  # direct hops + one table
        assert 0 <= chain.head < size
        assert s.next_available == (before.next_available + 1) & 0xFFFF
        data = chain.read(memory)
        assert len(data) == chain.readable_length
        written = chain.write(memory, data[:rng.randrange(64)], rng.randrange(8))
        queue.push(memory, chain.head, written)
        slot = FUZZ_USED + 4 + 8 * (before.next_used % size)
        assert (memory.read_u32(slot), memory.read_u32(slot + 4)) == (chain.head, written)
        assert memory.read_u16(FUZZ_USED + 2) == s.next_used
    # Whatever the ring holds now, these only ever answer or raise QueueError.
    try:
        queue.should_notify(memory)
        queue.disable_notifications(memory)
        queue.enable_notifications(memory)
    except QueueError:
        pass
