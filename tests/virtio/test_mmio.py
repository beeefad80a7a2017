"""The virtio-mmio transport, register by register (virtio 1.2 §4.2, §2.1, §3.1)."""

from __future__ import annotations

import dataclasses
import random
import threading
from dataclasses import dataclass, field

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from avmm.memory import ByteArrayMemory
from avmm.virtio.device import (
    COMMON_FEATURES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceContext,
    DeviceId,
    VirtioDevice,
)
from avmm.virtio.mmio import (
    MAGIC_VALUE,
    VENDOR_ID,
    DeviceStatus,
    MmioTransport,
    MmioTransportState,
    Register,
    TransportCallbacks,
    TransportStateError,
)

ACK = int(DeviceStatus.ACKNOWLEDGE)
DRIVER = int(DeviceStatus.DRIVER)
FEATURES_OK = int(DeviceStatus.FEATURES_OK)
DRIVER_OK = int(DeviceStatus.DRIVER_OK)
NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)
FAILED = int(DeviceStatus.FAILED)

DEVICE_FEATURE_A = 1 << 0
DEVICE_FEATURE_B = 1 << 5
CONFIG = bytes(range(0x10, 0x30))

#: (size, descriptor table, available ring, used ring) of each queue in a valid layout.
LAYOUT = ((8, 0x1000, 0x2000, 0x3000), (4, 0x4000, 0x5000, 0x6000))
MEMORY_SIZE = 0x10000


class FakeDevice(VirtioDevice):
    device_id = DeviceId.ENTROPY
    queue_max_sizes = (8, 4)
    name = "fake0"

    def __init__(self) -> None:
        self.config = bytearray(CONFIG)
        self.config_writes: list[tuple[int, bytes]] = []
        self.resets = 0
        self.fail_config = False

    def device_features(self) -> int:
        return DEVICE_FEATURE_A | DEVICE_FEATURE_B

    def read_config(self, offset: int, size: int) -> bytes:
        if self.fail_config:
            raise RuntimeError("device bug")
        return bytes(self.config[offset:offset + size]).ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        self.config_writes.append((offset, data))

    async def run(self, context: DeviceContext) -> None:
        await trio.sleep_forever()

    def reset(self) -> None:
        self.resets += 1
        self.config[:] = CONFIG


@dataclass
class Recorder:
    """Recording TransportCallbacks."""

    events: list[tuple[object, ...]] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)

    def _record(self, *event: object) -> None:
        self.events.append(event)
        if event[0] in self.fail:
            raise RuntimeError(f"{event[0]} callback bug")

    def callbacks(self) -> TransportCallbacks:
        return TransportCallbacks(
            activate=lambda transport: self._record("activate"),
            reset=lambda transport: self._record("reset"),
            interrupt=lambda: self._record("interrupt"),
            queue_notify=lambda index: self._record("notify", index),
        )

    def count(self, kind: str) -> int:
        return sum(1 for event in self.events if event[0] == kind)


def make() -> tuple[MmioTransport, FakeDevice, Recorder, ByteArrayMemory]:
    device = FakeDevice()
    recorder = Recorder()
    memory = ByteArrayMemory(MEMORY_SIZE)
    transport = MmioTransport(device, memory, recorder.callbacks(), name="test0")
    return transport, device, recorder, memory


def rd(transport: MmioTransport, register: int) -> int:
    return int.from_bytes(transport.read(register, 4), "little")


def wr(transport: MmioTransport, register: int, value: int) -> None:
    transport.write(register, (value & 0xFFFF_FFFF).to_bytes(4, "little"))


def set_status(transport: MmioTransport, bit: int) -> int:
    """Like Linux: read, OR in the bit, write, read back."""
    wr(transport, Register.STATUS, rd(transport, Register.STATUS) | bit)
    return rd(transport, Register.STATUS)


def write_features(transport: MmioTransport, features: int) -> None:
    for word in (0, 1):
        wr(transport, Register.DRIVER_FEATURES_SEL, word)
        wr(transport, Register.DRIVER_FEATURES, features >> (32 * word))


def setup_queue(transport: MmioTransport, index: int, size: int, desc: int, driver: int,
                device: int) -> None:
    wr(transport, Register.QUEUE_SEL, index)
    assert rd(transport, Register.QUEUE_READY) == 0
    assert rd(transport, Register.QUEUE_NUM_MAX) >= size
    wr(transport, Register.QUEUE_NUM, size)
    for low, value in ((Register.QUEUE_DESC_LOW, desc), (Register.QUEUE_DRIVER_LOW, driver),
                       (Register.QUEUE_DEVICE_LOW, device)):
        wr(transport, low, value)
        wr(transport, low + 4, value >> 32)
    wr(transport, Register.QUEUE_READY, 1)
    assert rd(transport, Register.QUEUE_READY) == 1


def negotiate(transport: MmioTransport, features: int | None = None) -> int:
    """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; return the status read back."""
    assert rd(transport, Register.MAGIC_VALUE) == MAGIC_VALUE
    assert rd(transport, Register.VERSION) == 2
    wr(transport, Register.STATUS, 0)
    set_status(transport, ACK)
    set_status(transport, DRIVER)
    if features is None:
        wr(transport, Register.DEVICE_FEATURES_SEL, 0)
        offered = rd(transport, Register.DEVICE_FEATURES)
        wr(transport, Register.DEVICE_FEATURES_SEL, 1)
        offered |= rd(transport, Register.DEVICE_FEATURES) << 32
        features = offered
    write_features(transport, features)
    return set_status(transport, FEATURES_OK)


def bring_up(transport: MmioTransport, features: int | None = None,
             layout: tuple[tuple[int, int, int, int], ...] = LAYOUT) -> int:
    """The whole Linux-style initialisation; return the final status read back."""
    assert negotiate(transport, features) & FEATURES_OK
    for index, (size, desc, driver, device) in enumerate(layout):
        setup_queue(transport, index, size, desc, driver, device)
    return set_status(transport, DRIVER_OK)


# -- identification and features ------------------------------------------------------


def test_identification_registers() -> None:
    transport, _, _, _ = make()
    assert rd(transport, Register.MAGIC_VALUE) == 0x74726976
    assert transport.read(0, 4) == b"virt"
    assert rd(transport, Register.VERSION) == 2
    assert rd(transport, Register.DEVICE_ID) == DeviceId.ENTROPY
    assert rd(transport, Register.VENDOR_ID) == VENDOR_ID == 0x4D4D5641
    assert transport.read(Register.VENDOR_ID, 4) == b"AVMM"
    assert MmioTransport.NOTIFY_OFFSET == 0x50


def test_device_features_are_offered_in_32_bit_words() -> None:
    transport, _, _, _ = make()
    offered = DEVICE_FEATURE_A | DEVICE_FEATURE_B | COMMON_FEATURES
    assert transport.offered_features == offered
    words = {}
    for word in (0, 1, 2, 7, 0xFFFF_FFFF):
        wr(transport, Register.DEVICE_FEATURES_SEL, word)
        words[word] = rd(transport, Register.DEVICE_FEATURES)
    assert words[0] == offered & 0xFFFF_FFFF
    assert words[1] == offered >> 32 == 1  # VERSION_1 is bit 32
    assert words[2] == words[7] == words[0xFFFF_FFFF] == 0


def test_linux_style_initialisation_activates_once() -> None:
    transport, device, recorder, _ = make()
    features = VIRTIO_F_VERSION_1 | DEVICE_FEATURE_B
    status = bring_up(transport, features)
    assert status == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    assert recorder.events == [("activate",)]
    assert transport.driver_ok and transport.activated
    assert transport.negotiated_features == features
    for queue, (size, desc, driver, used) in zip(transport.queues, LAYOUT, strict=True):
        assert queue.state.ready
        assert (queue.state.size, queue.state.descriptor_table, queue.state.available_ring,
                queue.state.used_ring) == (size, desc, driver, used)
    # Writing DRIVER_OK again (or any status already set) activates nothing more.
    assert set_status(transport, DRIVER_OK) == status
    wr(transport, Register.STATUS, status)
    assert recorder.count("activate") == 1
    assert device.resets == 1  # the reset that starts the sequence


def test_initial_reset_of_a_fresh_device_calls_no_callback() -> None:
    transport, device, recorder, _ = make()
    wr(transport, Register.STATUS, 0)
    assert recorder.events == []
    assert device.resets == 1


def test_features_ok_refused_without_version_1() -> None:
    transport, _, recorder, _ = make()
    with capture_logs() as logs:
        status = negotiate(transport, DEVICE_FEATURE_A)
    assert status == ACK | DRIVER  # FEATURES_OK did not stick
    assert transport.negotiated_features == 0
    assert any("VERSION_1" in entry["event"] for entry in logs)
    # Without FEATURES_OK, DRIVER_OK cannot stick either.
    assert set_status(transport, DRIVER_OK) == ACK | DRIVER
    assert recorder.count("activate") == 0


@pytest.mark.parametrize("unoffered", [1 << 1, 1 << 40, 1 << 63, VIRTIO_F_VERSION_1 << 2])
def test_features_ok_refused_with_features_not_offered(unoffered: int) -> None:
    transport, _, _, _ = make()
    with capture_logs() as logs:
        status = negotiate(transport, VIRTIO_F_VERSION_1 | unoffered)
    assert not status & FEATURES_OK
    assert any("not offered" in entry["event"] for entry in logs)
    # The driver may fix its choice and try again.
    write_features(transport, VIRTIO_F_VERSION_1)
    assert set_status(transport, FEATURES_OK) & FEATURES_OK


def test_driver_feature_words_beyond_63_bits_are_ignored() -> None:
    transport, _, _, _ = make()
    wr(transport, Register.STATUS, ACK | DRIVER)
    write_features(transport, VIRTIO_F_VERSION_1)
    wr(transport, Register.DRIVER_FEATURES_SEL, 2)
    with capture_logs() as logs:
        wr(transport, Register.DRIVER_FEATURES, 0xFFFF_FFFF)
    assert logs
    assert set_status(transport, FEATURES_OK) & FEATURES_OK
    assert transport.negotiated_features == VIRTIO_F_VERSION_1


def test_driver_features_cannot_change_after_features_ok() -> None:
    transport, _, _, _ = make()
    assert negotiate(transport, VIRTIO_F_VERSION_1) & FEATURES_OK
    write_features(transport, VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    assert transport.negotiated_features == VIRTIO_F_VERSION_1


@pytest.mark.parametrize(("extra", "event_idx", "indirect"), [
    (0, False, False),
    (VIRTIO_F_EVENT_IDX, True, False),
    (VIRTIO_F_INDIRECT_DESC, False, True),
    (VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC, True, True),
])
def test_event_idx_and_indirect_reach_the_queues(extra: int, event_idx: bool,
                                                 indirect: bool) -> None:
    transport, _, recorder, _ = make()
    bring_up(transport, VIRTIO_F_VERSION_1 | extra)
    assert recorder.events == [("activate",)]
    for queue in transport.queues:
        assert queue.state.event_idx is event_idx
        assert queue.state.indirect is indirect


# -- the status state machine ----------------------------------------------------------


def test_status_steps_must_come_in_order() -> None:
    transport, _, recorder, _ = make()
    wr(transport, Register.STATUS, DRIVER)  # without ACKNOWLEDGE
    assert rd(transport, Register.STATUS) == 0
    wr(transport, Register.STATUS, ACK | DRIVER)  # both at once, in order: fine
    assert rd(transport, Register.STATUS) == ACK | DRIVER
    wr(transport, Register.STATUS, ACK | DRIVER | DRIVER_OK)  # skips FEATURES_OK
    assert rd(transport, Register.STATUS) == ACK | DRIVER
    assert recorder.count("activate") == 0


def test_status_bits_are_only_cleared_by_a_reset() -> None:
    transport, _, _, _ = make()
    assert negotiate(transport) & FEATURES_OK
    wr(transport, Register.STATUS, ACK)
    assert rd(transport, Register.STATUS) == ACK | DRIVER | FEATURES_OK
    wr(transport, Register.STATUS, NEEDS_RESET | 0x30 | 0x100)  # not the driver's bits
    assert rd(transport, Register.STATUS) == ACK | DRIVER | FEATURES_OK
    wr(transport, Register.STATUS, 0)
    assert rd(transport, Register.STATUS) == 0


def test_reset_stops_the_device_and_restores_initial_values() -> None:
    transport, device, recorder, _ = make()
    fresh = [rd(transport, register) for register in Register]
    fresh_state = transport.state()
    bring_up(transport, VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    transport.signal_used()
    wr(transport, Register.DEVICE_FEATURES_SEL, 1)
    wr(transport, Register.QUEUE_SEL, 1)
    generation = rd(transport, Register.CONFIG_GENERATION)
    recorder.events.clear()
    device.resets = 0

    wr(transport, Register.STATUS, 0)
    assert recorder.events == [("reset",)]
    assert device.resets == 1
    assert not transport.driver_ok and not transport.activated
    assert transport.negotiated_features == 0
    # ConfigGeneration moves on; everything else reads as on a fresh device.
    assert rd(transport, Register.CONFIG_GENERATION) == generation + 1
    after = [rd(transport, register) for register in Register]
    for register, before, now in zip(Register, fresh, after, strict=True):
        if register is not Register.CONFIG_GENERATION:
            assert before == now, register.name
    state = transport.state()
    assert state.queues == fresh_state.queues
    assert (state.status, state.driver_features, state.interrupt_status, state.queue_sel,
            state.device_features_sel) == (0, 0, 0, 0, 0)
    # And the device can be brought up again.
    bring_up(transport)
    assert recorder.events == [("reset",), ("activate",)]


def test_reset_after_partial_setup_calls_the_callback() -> None:
    transport, _, recorder, _ = make()
    negotiate(transport)
    wr(transport, Register.STATUS, 0)
    assert recorder.events == [("reset",)]


def test_vm_initiated_reset() -> None:
    transport, device, recorder, _ = make()
    bring_up(transport)
    device.resets = 0
    transport.reset()
    assert recorder.events == [("activate",), ("reset",)]
    assert transport.status == 0 and device.resets == 1


def test_failed_stops_the_device_and_sticks_until_reset() -> None:
    transport, device, recorder, _ = make()
    status = bring_up(transport)
    assert set_status(transport, FAILED) == status | FAILED
    assert recorder.events == [("activate",), ("reset",)]
    assert not transport.activated
    transport.signal_used()  # a straggling device task: no interrupt
    assert recorder.count("interrupt") == 0
    wr(transport, Register.STATUS, status | FAILED | DRIVER_OK)
    assert rd(transport, Register.STATUS) == status | FAILED
    wr(transport, Register.STATUS, 0)
    assert rd(transport, Register.STATUS) == 0
    assert recorder.count("reset") == 2  # the callback must cope with a stopped device
    assert device.resets == 2  # the reset that started the sequence, and this one
    bring_up(transport)
    assert recorder.count("activate") == 2


def test_failed_before_driver_ok_never_activates() -> None:
    transport, _, recorder, _ = make()
    negotiate(transport)
    set_status(transport, FAILED)
    assert recorder.events == []
    set_status(transport, DRIVER_OK)
    assert recorder.events == []
    assert rd(transport, Register.STATUS) & FAILED


# -- queue setup -----------------------------------------------------------------------


@pytest.mark.parametrize(("queue", "field_name", "value", "reason"), [
    (0, "descriptor_table", 0x1008, "aligned"),
    (0, "available_ring", 0x2001, "aligned"),
    (1, "used_ring", 0x6002, "aligned"),
    (0, "used_ring", MEMORY_SIZE - 8, "inside guest RAM"),
    (1, "descriptor_table", 1 << 40, "inside guest RAM"),
    (0, "size", 6, "power of two"),
])
def test_invalid_queue_at_driver_ok_needs_reset(queue: int, field_name: str, value: int,
                                                reason: str) -> None:
    transport, _, recorder, _ = make()
    layout = [list(entry) for entry in LAYOUT]
    index = ("size", "descriptor_table", "available_ring", "used_ring").index(field_name)
    layout[queue][index] = value
    with capture_logs() as logs:
        status = bring_up(transport, layout=tuple(tuple(entry) for entry in layout))
    assert status == ACK | DRIVER | FEATURES_OK | NEEDS_RESET
    assert recorder.events == []  # no activate, and no interrupt without DRIVER_OK
    refusal = [entry for entry in logs if entry["event"] == "DRIVER_OK refused: invalid queue"]
    assert refusal and reason in refusal[0]["reason"]
    assert refusal[0]["reason"].startswith(f"queue {queue}:")
    # The driver cannot go on without a reset ...
    assert set_status(transport, DRIVER_OK) & DRIVER_OK == 0
    # ... and after one the device works.
    bring_up(transport)
    assert recorder.events == [("reset",), ("activate",)]


def test_queues_the_driver_leaves_disabled_are_not_validated() -> None:
    transport, _, recorder, _ = make()
    assert bring_up(transport, layout=LAYOUT[:1]) & DRIVER_OK
    assert recorder.events == [("activate",)]
    assert [queue.state.ready for queue in transport.queues] == [True, False]


def test_queue_sel_out_of_range_selects_nothing() -> None:
    transport, _, _, _ = make()
    negotiate(transport)
    before = transport.state()
    for index in (2, 3, 0xFFFF, 0xFFFF_FFFF):
        wr(transport, Register.QUEUE_SEL, index)
        assert rd(transport, Register.QUEUE_NUM_MAX) == 0
        assert rd(transport, Register.QUEUE_READY) == 0
        for register in (Register.QUEUE_NUM, Register.QUEUE_DESC_LOW, Register.QUEUE_READY,
                         Register.QUEUE_DEVICE_HIGH):
            wr(transport, register, 1)
        assert rd(transport, Register.QUEUE_READY) == 0
    after = transport.state()
    assert after.queues == before.queues


def test_queue_num_max_and_num() -> None:
    transport, _, _, _ = make()
    for index, maximum in enumerate(FakeDevice.queue_max_sizes):
        wr(transport, Register.QUEUE_SEL, index)
        assert rd(transport, Register.QUEUE_NUM_MAX) == maximum
        assert transport.queues[index].state.size == maximum  # until the driver chooses
    wr(transport, Register.QUEUE_SEL, 0)
    wr(transport, Register.QUEUE_NUM, 2)
    assert transport.queues[0].state.size == 2
    assert rd(transport, Register.QUEUE_NUM) == 0  # write-only


@pytest.mark.parametrize("size", [0, 3, 16, 0xFFFF_FFFF])
def test_invalid_queue_num_is_logged_and_fails_driver_ok(size: int) -> None:
    transport, _, recorder, _ = make()
    negotiate(transport)
    with capture_logs() as logs:
        wr(transport, Register.QUEUE_SEL, 0)
        wr(transport, Register.QUEUE_NUM, size)
    assert any("power of two" in entry["event"] for entry in logs)
    setup_queue(transport, 1, *LAYOUT[1])
    wr(transport, Register.QUEUE_SEL, 0)
    wr(transport, Register.QUEUE_READY, 1)  # the driver goes on regardless
    assert set_status(transport, DRIVER_OK) & (DRIVER_OK | NEEDS_RESET) == NEEDS_RESET
    assert recorder.count("activate") == 0


def test_queue_addresses_are_written_in_halves() -> None:
    transport, _, _, _ = make()
    wr(transport, Register.QUEUE_SEL, 1)
    wr(transport, Register.QUEUE_DESC_LOW, 0x8765_4320)
    wr(transport, Register.QUEUE_DESC_HIGH, 0x1)
    wr(transport, Register.QUEUE_DRIVER_HIGH, 0xABCD)
    wr(transport, Register.QUEUE_DRIVER_LOW, 0x10)
    wr(transport, Register.QUEUE_DEVICE_LOW, 0xFFFF_FFFC)
    wr(transport, Register.QUEUE_DEVICE_HIGH, 0xFFFF_FFFF)
    wr(transport, Register.QUEUE_DEVICE_LOW, 0x40)
    state = transport.queues[1].state
    assert state.descriptor_table == 0x1_8765_4320
    assert state.available_ring == 0xABCD_0000_0010
    assert state.used_ring == 0xFFFF_FFFF_0000_0040
    assert transport.queues[0].state.descriptor_table == 0


def test_queue_config_is_frozen_while_ready_and_after_driver_ok() -> None:
    transport, _, _, _ = make()
    negotiate(transport)
    setup_queue(transport, 0, *LAYOUT[0])
    with capture_logs() as logs:
        wr(transport, Register.QUEUE_NUM, 2)
        wr(transport, Register.QUEUE_DESC_LOW, 0x8000)
    assert {entry["event"] for entry in logs} == {
        "queue register written while the queue is ready"}
    assert transport.queues[0].state.size == 8
    assert transport.queues[0].state.descriptor_table == 0x1000
    # Before DRIVER_OK the driver may take a queue back and change it.
    wr(transport, Register.QUEUE_READY, 0)
    assert rd(transport, Register.QUEUE_READY) == 0
    wr(transport, Register.QUEUE_NUM, 4)
    assert transport.queues[0].state.size == 4
    wr(transport, Register.QUEUE_READY, 1)
    setup_queue(transport, 1, *LAYOUT[1])
    set_status(transport, DRIVER_OK)
    # After DRIVER_OK a queue can neither stop (reads back 1) nor change.
    wr(transport, Register.QUEUE_SEL, 0)
    wr(transport, Register.QUEUE_READY, 0)
    assert rd(transport, Register.QUEUE_READY) == 1
    wr(transport, Register.QUEUE_READY, 2)
    assert rd(transport, Register.QUEUE_READY) == 1
    assert transport.queues[0].state.size == 4


def test_no_queue_can_be_enabled_after_driver_ok() -> None:
    transport, _, _, _ = make()
    bring_up(transport, layout=LAYOUT[:1])
    setup_queue_registers = [(Register.QUEUE_SEL, 1), (Register.QUEUE_NUM, 4),
                             (Register.QUEUE_DESC_LOW, 0x4000), (Register.QUEUE_READY, 1)]
    for register, value in setup_queue_registers:
        wr(transport, register, value)
    assert rd(transport, Register.QUEUE_READY) == 0
    assert transport.queues[1].state.descriptor_table == 0


def test_queue_reset_and_shared_memory_registers() -> None:
    transport, _, _, _ = make()
    assert rd(transport, Register.QUEUE_RESET) == 0
    wr(transport, Register.QUEUE_RESET, 1)
    assert rd(transport, Register.QUEUE_RESET) == 0
    wr(transport, Register.SHM_SEL, 0)
    for register in (Register.SHM_LEN_LOW, Register.SHM_LEN_HIGH, Register.SHM_BASE_LOW,
                     Register.SHM_BASE_HIGH):
        assert rd(transport, register) == 0xFFFF_FFFF


# -- notifications and interrupts ------------------------------------------------------


def test_queue_notify_wakes_a_ready_queue() -> None:
    transport, _, recorder, _ = make()
    bring_up(transport, layout=LAYOUT[:1])
    recorder.events.clear()
    wr(transport, Register.QUEUE_NOTIFY, 0)
    wr(transport, Register.QUEUE_NOTIFY, 0xABCD_0000)  # upper half: notification data
    wr(transport, Register.QUEUE_NOTIFY, 1)  # exists, not ready
    wr(transport, Register.QUEUE_NOTIFY, 7)  # does not exist
    assert recorder.events == [("notify", 0), ("notify", 0)]
    assert transport.read(Register.QUEUE_NOTIFY, 4) == bytes(4)  # write-only


def test_queue_notify_before_driver_ok_is_forwarded_like_an_ioeventfd() -> None:
    transport, _, recorder, _ = make()
    negotiate(transport)
    wr(transport, Register.QUEUE_NOTIFY, 0)  # not ready yet
    setup_queue(transport, 0, *LAYOUT[0])
    wr(transport, Register.QUEUE_NOTIFY, 0)
    assert recorder.events == [("notify", 0)]


def test_interrupt_status_and_ack() -> None:
    transport, _, recorder, _ = make()
    transport.signal_used()  # not activated: dropped
    assert rd(transport, Register.INTERRUPT_STATUS) == 0
    assert recorder.events == []
    bring_up(transport)
    recorder.events.clear()
    transport.signal_used()
    assert rd(transport, Register.INTERRUPT_STATUS) == 1
    transport.signal_config_change()
    assert rd(transport, Register.INTERRUPT_STATUS) == 3
    assert recorder.events == [("interrupt",), ("interrupt",)]
    wr(transport, Register.INTERRUPT_ACK, 1)
    assert rd(transport, Register.INTERRUPT_STATUS) == 2
    wr(transport, Register.INTERRUPT_ACK, 0xFFFF_FFFC)  # undefined bits: nothing acked
    assert rd(transport, Register.INTERRUPT_STATUS) == 2
    wr(transport, Register.INTERRUPT_ACK, 2)
    assert rd(transport, Register.INTERRUPT_STATUS) == 0
    wr(transport, Register.INTERRUPT_STATUS, 3)  # read-only
    assert rd(transport, Register.INTERRUPT_STATUS) == 0


def test_a_transport_whose_device_interrupts_by_itself_reads_used_while_activated() -> None:
    # A vhost-user back-end, or blk's C run: the transport never sees a notification,
    # so the driver's handler must look at its used rings on every interrupt.
    device, recorder = FakeDevice(), Recorder()
    transport = MmioTransport(device, ByteArrayMemory(MEMORY_SIZE), recorder.callbacks(),
                              name="test0", external_used_notifications=True)
    assert transport.reports_used_always
    assert rd(transport, Register.INTERRUPT_STATUS) == 0  # not activated
    bring_up(transport)
    assert rd(transport, Register.INTERRUPT_STATUS) == 1
    wr(transport, Register.INTERRUPT_ACK, 1)
    assert rd(transport, Register.INTERRUPT_STATUS) == 1
    transport.signal_config_change()
    assert rd(transport, Register.INTERRUPT_STATUS) == 3
    wr(transport, Register.STATUS, 0)
    assert rd(transport, Register.INTERRUPT_STATUS) & 1 == 0  # reset: nothing to look at
    assert not make()[0].reports_used_always


def test_config_change_before_driver_ok_bumps_the_generation_without_interrupt() -> None:
    transport, _, recorder, _ = make()
    assert rd(transport, Register.CONFIG_GENERATION) == 0
    transport.signal_config_change()
    assert rd(transport, Register.CONFIG_GENERATION) == 1
    assert rd(transport, Register.INTERRUPT_STATUS) == 0
    assert recorder.events == []


def test_needs_reset_before_and_after_driver_ok() -> None:
    transport, _, recorder, _ = make()
    negotiate(transport)
    transport.set_needs_reset("early trouble")
    assert rd(transport, Register.STATUS) & NEEDS_RESET
    assert rd(transport, Register.INTERRUPT_STATUS) == 0 and recorder.events == []
    wr(transport, Register.STATUS, 0)

    bring_up(transport)
    recorder.events.clear()
    generation = rd(transport, Register.CONFIG_GENERATION)
    with capture_logs() as logs:
        transport.set_needs_reset("descriptor loop")
        transport.set_needs_reset("still broken")
    assert rd(transport, Register.STATUS) & NEEDS_RESET
    assert rd(transport, Register.INTERRUPT_STATUS) == 2  # config change (§2.1.2)
    assert rd(transport, Register.CONFIG_GENERATION) == generation + 1
    assert recorder.events == [("interrupt",)]  # once, not per call
    warning = [entry for entry in logs if entry["log_level"] == "warning"]
    assert warning == [{"event": "virtio device needs reset", "reason": "descriptor loop",
                        "device": "test0", "log_level": "warning"}]
    # A driver that writes back what it read (NEEDS_RESET included) changes nothing.
    wr(transport, Register.STATUS, rd(transport, Register.STATUS))
    assert recorder.events == [("interrupt",)]


# -- config space ----------------------------------------------------------------------


def test_config_space_reads_and_writes_go_to_the_device() -> None:
    transport, device, _, _ = make()
    assert transport.read(0x100, 1) == CONFIG[:1]
    assert transport.read(0x101, 2) == CONFIG[1:3]  # config accepts unaligned accesses
    assert transport.read(0x104, 4) == CONFIG[4:8]
    assert transport.read(0x108, 8) == CONFIG[8:16]
    assert transport.read(0x100 + len(CONFIG) - 2, 4) == CONFIG[-2:] + bytes(2)
    assert transport.read(0x102, 3) == bytes(3)  # not a field width
    assert transport.read(0xFFE, 4) == bytes(4)  # runs off the window
    transport.write(0x104, b"\x01\x02")
    transport.write(0x110, bytes(8))
    transport.write(0x100, b"\x01\x02\x03")  # dropped
    assert device.config_writes == [(4, b"\x01\x02"), (0x10, bytes(8))]


def test_config_generation_follows_config_changes() -> None:
    transport, _, _, _ = make()
    bring_up(transport)
    first = rd(transport, Register.CONFIG_GENERATION)
    assert rd(transport, Register.CONFIG_GENERATION) == first
    transport.signal_config_change()
    transport.signal_config_change()
    assert rd(transport, Register.CONFIG_GENERATION) == (first + 2) & 0xFFFF_FFFF
    wr(transport, Register.CONFIG_GENERATION, 0)  # read-only
    assert rd(transport, Register.CONFIG_GENERATION) == first + 2


def test_config_generation_wraps() -> None:
    transport, _, _, _ = make()
    state = dataclasses.replace(transport.state(), config_generation=0xFFFF_FFFF)
    transport.restore(state)
    transport.signal_config_change()
    assert rd(transport, Register.CONFIG_GENERATION) == 0


# -- a guest that breaks the rules -----------------------------------------------------


@pytest.mark.parametrize(("offset", "size"), [
    (0x000, 1), (0x001, 4), (0x002, 2), (0x070, 8), (0x072, 2), (0x003, 1), (0x0FE, 2),
])
def test_misaligned_or_odd_sized_register_accesses(offset: int, size: int) -> None:
    transport, _, recorder, _ = make()
    negotiate(transport)
    before = transport.state()
    with capture_logs() as logs:
        for _ in range(3):
            assert transport.read(offset, size) == bytes(size)
            transport.write(offset, b"\xff" * size)
    assert transport.state() == before
    assert recorder.events == []
    assert len(logs) == 2  # one for the reads, one for the writes, not one per access


def test_undefined_and_wrong_direction_registers() -> None:
    transport, _, _, _ = make()
    with capture_logs() as logs:
        for offset in (0x018, 0x028, 0x03C, 0x040, 0x0C4, 0x0F8):  # incl. legacy ones
            assert rd(transport, offset) == 0
            wr(transport, offset, 0xFFFF_FFFF)
        wr(transport, Register.MAGIC_VALUE, 0)
        wr(transport, Register.DEVICE_ID, 0)
        assert rd(transport, Register.DRIVER_FEATURES) == 0
    assert rd(transport, Register.MAGIC_VALUE) == MAGIC_VALUE
    assert rd(transport, Register.DEVICE_ID) == DeviceId.ENTROPY
    assert all(entry["log_level"] == "warning" for entry in logs)
    assert transport.status == 0


def test_raising_callbacks_never_reach_the_vcpu() -> None:
    transport, _, recorder, _ = make()
    recorder.fail = {"activate", "notify", "interrupt"}
    with capture_logs():
        bring_up(transport, layout=LAYOUT[:1])
        assert recorder.count("activate") == 1
        # The activation failed: DEVICE_NEEDS_RESET, with a config interrupt (raised too).
        assert rd(transport, Register.STATUS) & NEEDS_RESET
        wr(transport, Register.QUEUE_NOTIFY, 0)
        transport.signal_used()
        recorder.fail = {"reset"}
        wr(transport, Register.STATUS, 0)
    assert rd(transport, Register.STATUS) == 0
    assert recorder.count("reset") == 1


def test_a_device_bug_in_a_config_read_needs_reset() -> None:
    transport, device, _, _ = make()
    device.fail_config = True
    with capture_logs() as logs:
        assert transport.read(0x100, 4) == bytes(4)
    assert transport.status & NEEDS_RESET
    assert any(entry["event"] == "virtio-mmio internal error" for entry in logs)


_INTERESTING_OFFSETS = st.one_of(
    st.sampled_from([int(register) for register in Register]),
    st.integers(min_value=0, max_value=0x1010),
    st.integers(min_value=-8, max_value=1 << 40),
)
_INTERESTING_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 7, 8, 0xB, 0xF, 0x40, 0x80, 0x8F, 0xFF,
                     0x1000, 0x2000, 0x3000, 0x4000, 0xFFFF_FFFF]),
    st.integers(min_value=0, max_value=0xFFFF_FFFF),
)
_OPERATIONS = st.one_of(
    st.tuples(st.just("read"), _INTERESTING_OFFSETS, st.sampled_from([0, 1, 2, 3, 4, 8])),
    st.tuples(st.just("write32"), st.sampled_from([int(register) for register in Register]),
              _INTERESTING_VALUES),
    st.tuples(st.just("write"), _INTERESTING_OFFSETS, st.binary(max_size=9)),
    st.tuples(st.just("bring_up"), st.integers(min_value=0, max_value=2), st.just(0)),
    st.tuples(st.sampled_from(["signal_used", "config_change", "needs_reset", "reset"]),
              st.just(0), st.just(0)),
)


def quiet_bring_up(transport: MmioTransport, *, reset: bool = False,
                   queues: bool = True) -> None:
    """A proper initialisation (optionally without the first reset or the queue setup)
    from whatever state the transport is in, checking nothing."""
    if reset:
        wr(transport, Register.STATUS, 0)
    status = set_status(transport, ACK | DRIVER)
    if not status & FEATURES_OK:
        write_features(transport, VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
        set_status(transport, FEATURES_OK)
    if queues:
        for index, (size, *addresses) in enumerate(LAYOUT):
            wr(transport, Register.QUEUE_SEL, index)
            if rd(transport, Register.QUEUE_READY):
                continue
            wr(transport, Register.QUEUE_NUM, size)
            for register, address in zip((Register.QUEUE_DESC_LOW, Register.QUEUE_DRIVER_LOW,
                                          Register.QUEUE_DEVICE_LOW), addresses, strict=True):
                wr(transport, register, address)
                wr(transport, register + 4, 0)
            wr(transport, Register.QUEUE_READY, 1)
    set_status(transport, DRIVER_OK)


def _assert_one_activation_per_driver_ok(events: list[tuple[object, ...]]) -> None:
    running = False
    for event in events:
        if event[0] == "activate":
            assert not running, "activated twice without a reset in between"
            running = True
        elif event[0] == "reset":
            running = False


@settings(max_examples=3000, deadline=None)
@given(st.lists(_OPERATIONS, max_size=40))
def test_random_register_traffic_never_raises(
        operations: list[tuple[str, int, object]]) -> None:
    with capture_logs():
        transport, _, recorder, _ = make()
        for kind, first, second in operations:
            if kind == "read":
                assert isinstance(second, int)
                data = transport.read(first, second)
                assert len(data) == second
            elif kind == "write32":
                assert isinstance(second, int)
                wr(transport, first, second)
            elif kind == "write":
                assert isinstance(second, bytes)
                transport.write(first, second)
            elif kind == "bring_up":
                quiet_bring_up(transport, reset=first == 0, queues=first < 2)
            elif kind == "signal_used":
                transport.signal_used()
            elif kind == "config_change":
                transport.signal_config_change()
            elif kind == "needs_reset":
                transport.set_needs_reset("fuzz")
            else:
                transport.reset()
            status = transport.status
            assert 0 <= status <= 0xFF
            assert transport.activated <= bool(status & DRIVER_OK)
        _assert_one_activation_per_driver_ok(recorder.events)


def test_random_traffic_from_several_vcpus() -> None:
    transport, _, recorder, _ = make()
    registers = [int(register) for register in Register]
    errors: list[BaseException] = []

    def vcpu(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(3000):
                choice = rng.random()
                if choice < 0.05:
                    quiet_bring_up(transport)
                elif choice < 0.5:
                    transport.read(rng.choice(registers), 4)
                elif choice < 0.55:
                    transport.signal_used()
                else:
                    wr(transport, rng.choice(registers), rng.choice([0, 1, 2, 4, 8, 0xF]))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    with capture_logs():
        threads = [threading.Thread(target=vcpu, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    # Several vCPUs may race each other's Status writes; even then each activation is
    # followed by a reset before the next one.
    _assert_one_activation_per_driver_ok(recorder.events)


# -- snapshots -------------------------------------------------------------------------


def test_state_and_restore_round_trip() -> None:
    transport, _, _, memory = make()
    bring_up(transport, VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC)
    transport.signal_used()
    wr(transport, Register.QUEUE_SEL, 1)
    wr(transport, Register.DEVICE_FEATURES_SEL, 1)
    transport.queues[0].state.next_available = 5
    state = transport.state()
    assert isinstance(state, MmioTransportState)
    assert type(state.status) is int and type(state.interrupt_status) is int
    # The copy is detached from the live queues.
    transport.queues[0].state.next_available = 6
    assert state.queues[0].next_available == 5

    recorder = Recorder()
    copy = MmioTransport(FakeDevice(), memory, recorder.callbacks())
    copy.restore(state)
    assert recorder.events == []  # restore calls nothing
    assert copy.activated and copy.driver_ok
    assert copy.state() == state
    assert copy.negotiated_features == VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC
    for register in Register:
        if register in (Register.MAGIC_VALUE, Register.VERSION, Register.DEVICE_ID,
                        Register.VENDOR_ID):
            continue
        original = transport.read(register, 4)
        if register is not Register.QUEUE_READY or transport.queues[1].state.ready:
            assert copy.read(register, 4) == original, register.name
    copy.signal_used()
    assert recorder.events == [("interrupt",)]
    wr(copy, Register.STATUS, 0)
    assert recorder.events[-1] == ("reset",)


def test_restored_failed_device_is_not_activated() -> None:
    transport, _, _, memory = make()
    bring_up(transport)
    transport.set_needs_reset("broken")
    copy = MmioTransport(FakeDevice(), memory, Recorder().callbacks())
    copy.restore(transport.state())
    assert copy.driver_ok and not copy.activated


def test_restore_rejects_a_state_of_another_device() -> None:
    transport, _, _, _ = make()
    state = transport.state()
    with pytest.raises(TransportStateError):
        transport.restore(MmioTransportState(queues=state.queues[:1]))
    queues = [*state.queues[:1], dataclasses.replace(state.queues[1], max_size=64)]
    with pytest.raises(TransportStateError):
        transport.restore(dataclasses.replace(state, queues=queues))
