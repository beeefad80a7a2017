"""avmm's vhost-user front-end against back-ends that fail, hang or offer more than it
can carry (issue 11, B2, B5, B6):

* every started ring gets an error eventfd (SET_VRING_ERR); when the back-end signals
  it, the device goes to DEVICE_NEEDS_RESET with a configuration-change interrupt
  (virtio 1.2 §2.1.2) and its rings are stopped;
* block features the front-end cannot carry are not offered to the driver, and the
  queue count in the config space is the one the driver gets (PROTOCOL_F_MQ);
* a driver reset completes only once the back-end has confirmed that its rings
  stopped (GET_VRING_BASE answered, or the connection closed by the back-end); until
  then Status reads non-zero.

Most tests run the front-end in a virtio-mmio slot without KVM against
:class:`~tests.vhost.scripted_backend.ScriptedBackend`; the guest tests run the test
guest against ``avmm backend blk`` and qemu-storage-daemon.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from avmm import StopReason
from avmm.memory import GuestMemory
from avmm.vhost.frontend import VhostUserDevice
from avmm.vhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature, Request
from avmm.virtio.device import VIRTIO_F_VERSION_1, DeviceId
from avmm.virtio.mmio import DeviceStatus, InterruptReason
from avmm.vm_virtio import VirtioMmioSlot
from tests.prerequisites import require
from tests.vhost.scripted_backend import ScriptedBackend, scripted_backend, wait_until
from tests.vhost.test_frontend import avmm_backend, blk_config, random_image, run
from tests.virtio.slot_harness import OK_STATUS, Driver, drain_interrupts, make_slot

NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)
REPLY_ACK = 1 << ProtocolFeature.REPLY_ACK
PROTOCOL_MQ = 1 << ProtocolFeature.MQ
PROTOCOL_CONFIG = 1 << ProtocolFeature.CONFIG

# virtio-blk feature bits (virtio 1.2 §5.2.3) and config offsets (§5.2.4).
BLK_F_FLUSH = 1 << 9
BLK_F_CONFIG_WCE = 1 << 11
BLK_F_MQ = 1 << 12
BLK_F_SECURE_ERASE = 1 << 16
BLK_F_ZONED = 1 << 17
BLK_NUM_QUEUES = 34


def blk_config_space(*, capacity: int = 2048, num_queues: int = 1) -> bytes:
    config = bytearray(60)
    struct.pack_into("<Q", config, 0, capacity)
    struct.pack_into("<H", config, BLK_NUM_QUEUES, num_queues)
    return bytes(config)


async def make_device(sock: Path, memory: GuestMemory | None = None, **kwargs: object
                      ) -> VhostUserDevice:
    """The front-end's device (its handshake blocks: a worker thread, as the VM build)."""
    return await trio.to_thread.run_sync(
        lambda: VhostUserDevice(sock, memory=memory, **kwargs))  # type: ignore[arg-type]


@asynccontextmanager
async def running_slot(sock: Path, **kwargs: object
                       ) -> AsyncIterator[tuple[VirtioMmioSlot, Driver]]:
    """A front-end device in a slot whose device tasks run in a nursery of this test."""
    memory = GuestMemory(1 << 20)
    try:
        device = await make_device(sock, memory, **kwargs)
        slot = make_slot(device, memory)
        try:
            async with trio.open_nursery() as nursery:
                slot.attach(nursery)
                yield slot, Driver(slot.transport)
                nursery.cancel_scope.cancel()
        finally:
            slot.close()
    finally:
        memory.close()


def rings_running(backend: ScriptedBackend, last_ring: int) -> Callable[[], bool]:
    """The bring-up reached its end: the last ring was enabled."""
    return lambda: backend.seen(Request.SET_VRING_ENABLE, last_ring) >= 1


async def in_thread(function: Callable[..., object], *args: object) -> object:
    return await trio.to_thread.run_sync(function, *args)


# -- a back-end lost during the first bring-up --------------------------------------


async def test_a_backend_lost_once_it_had_a_kick_fd_is_reconnected_not_reset(
    tmp_path: Path,
) -> None:
    """qemu-storage-daemon runs a ring as soon as it has the kick fd, before the
    bring-up's last ack: a crash from then on may follow requests it took, so the
    front-end reconnects (CI once saw the guest get DEVICE_NEEDS_RESET instead)."""
    sock = tmp_path / "be.sock"
    features = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES
    with scripted_backend(sock, features=features, protocol_features=REPLY_ACK,
                          drop_after=Request.SET_VRING_KICK) as first:
        async with running_slot(sock, device_id=DeviceId.ENTROPY) as (slot, driver):
            await in_thread(driver.bring_up, (0,))
            assert await in_thread(first.closed.wait, 20.0)
            sock.unlink()
            with scripted_backend(sock, features=features,
                                  protocol_features=REPLY_ACK) as second:
                await in_thread(wait_until, rings_running(second, 0), 20.0,
                                "the bring-up on the new back-end")
                device = slot.device
                assert isinstance(device, VhostUserDevice)
                await in_thread(wait_until, lambda: device.reconnects == 1, 10.0,
                                "the reconnect")
                assert driver.status == OK_STATUS
                # Resumed from the used index in guest memory: the dead back-end may
                # have taken requests that it never completed.
                assert second.seen(Request.SET_VRING_BASE, 0) == 1


async def test_a_backend_lost_before_any_kick_fd_needs_a_reset_at_once(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "be.sock"
    features = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES
    with scripted_backend(sock, features=features, protocol_features=REPLY_ACK,
                          drop_after=Request.SET_MEM_TABLE) as backend:
        async with running_slot(sock, device_id=DeviceId.ENTROPY) as (slot, driver):
            await in_thread(driver.bring_up, (0,))
            await in_thread(wait_until, lambda: driver.status & NEEDS_RESET, 10.0,
                            "DEVICE_NEEDS_RESET")
            device = slot.device
            assert isinstance(device, VhostUserDevice)
            assert device.reconnects == 0
            assert backend.seen(Request.SET_VRING_KICK) == 0


# -- B2: the back-end's error eventfd -------------------------------------------------


async def test_each_ring_gets_an_error_eventfd_and_an_error_needs_a_reset(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "be.sock"
    with scripted_backend(sock, features=VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES,
                          protocol_features=REPLY_ACK | PROTOCOL_MQ, queue_num=2) as backend:
        async with running_slot(sock, device_id=DeviceId.ENTROPY) as (slot, driver):
            await in_thread(driver.bring_up, (0, 1))
            await in_thread(wait_until, rings_running(backend, 1), 20.0, "bring-up")
            for index in (0, 1):
                assert backend.seen(Request.SET_VRING_ERR, index) == 1
                fd = backend.ring_fds[(Request.SET_VRING_ERR, index)]
                assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
            assert driver.status == OK_STATUS
            drain_interrupts(slot)

            # The back-end reports a broken ring 1.
            os.eventfd_write(backend.ring_fds[(Request.SET_VRING_ERR, 1)], 1)
            await in_thread(wait_until, lambda: driver.status & NEEDS_RESET, 10.0,
                            "DEVICE_NEEDS_RESET")
            assert driver.status == OK_STATUS | NEEDS_RESET
            assert slot.transport.interrupt_status & InterruptReason.CONFIG_CHANGE
            assert drain_interrupts(slot) >= 1  # the configuration change interrupt
            # The front-end's state follows the back-end's: both rings are stopped.
            await in_thread(wait_until, lambda: all(
                backend.seen(Request.GET_VRING_BASE, index) == 1 for index in (0, 1)),
                10.0, "GET_VRING_BASE")

            # The driver resets and starts again: an error from before the reset does
            # not count against the new run.
            await in_thread(driver.reset)
            assert driver.status == 0
            await in_thread(driver.bring_up, (0, 1))
            await in_thread(wait_until, lambda: backend.seen(Request.SET_VRING_ENABLE, 1) >= 2,
                            20.0, "second bring-up")
            await trio.sleep(0.2)
            assert driver.status == OK_STATUS
            assert backend.seen(Request.SET_VRING_ERR, 1) == 2


async def test_a_backend_that_refuses_the_error_eventfd_still_runs(tmp_path: Path) -> None:
    sock = tmp_path / "be.sock"
    with scripted_backend(sock, features=VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES,
                          protocol_features=REPLY_ACK,
                          nack=frozenset({Request.SET_VRING_ERR})) as backend, \
            capture_logs() as logs:
        async with running_slot(sock, device_id=DeviceId.ENTROPY) as (_slot, driver):
            await in_thread(driver.bring_up, (0,))
            await in_thread(wait_until, rings_running(backend, 0), 20.0, "bring-up")
            await trio.sleep(0.2)
            assert backend.seen(Request.SET_VRING_ERR, 0) == 1
            assert driver.status == OK_STATUS  # refused, not broken: no NEEDS_RESET
    assert any("SET_VRING_ERR" in str(entry) for entry in logs), logs


@pytest.mark.kvm
@pytest.mark.guest
@pytest.mark.parametrize("hostility", ["loop", "oob"])
async def test_a_hostile_chain_behind_avmm_backend_blk_needs_a_reset(
    tmp_path: Path, hostility: str,
) -> None:
    """The back-end finds the broken chain and signals its error eventfd; the guest sees
    DEVICE_NEEDS_RESET, resets the device and reads through it again."""
    image = random_image(tmp_path / "disk.img", 1 << 20)
    sock = tmp_path / "blk.sock"
    with avmm_backend("blk", sock, "--image", str(image)):
        result, output, _vm = await run(blk_config(
            f"avmm.test=blk-hostile avmm.hostile={hostility}", sock))
    assert "blk0 needs_reset=1" in output, output
    assert "blk0 recovered=ok" in output, output
    assert result.reason is StopReason.RESET, (result, output)


# -- B5: block features and queues ----------------------------------------------------


async def test_block_features_the_frontend_cannot_carry_are_not_offered(
    tmp_path: Path,
) -> None:
    """No PROTOCOL_F_MQ: one queue, so VIRTIO_BLK_F_MQ (with num_queues = 4 in the
    back-end's config) must not reach the driver; CONFIG_WCE needs config writes the
    front-end does not relay; SECURE_ERASE and ZONED need config fields past the part
    it fetches."""
    sock = tmp_path / "be.sock"
    offered = (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | BLK_F_FLUSH
               | BLK_F_CONFIG_WCE | BLK_F_MQ | BLK_F_SECURE_ERASE | BLK_F_ZONED)
    with scripted_backend(sock, features=offered, protocol_features=PROTOCOL_CONFIG,
                          config=blk_config_space(num_queues=4)):
        device = await make_device(sock, device_id=DeviceId.BLOCK)
        try:
            features = device.device_features()
            assert len(device.queue_max_sizes) == 1
            assert features & BLK_F_FLUSH and features & VIRTIO_F_VERSION_1
            assert not features & (BLK_F_MQ | BLK_F_CONFIG_WCE | BLK_F_SECURE_ERASE
                                   | BLK_F_ZONED), hex(features)
            assert struct.unpack("<H", device.read_config(BLK_NUM_QUEUES, 2))[0] <= 1
            assert struct.unpack("<Q", device.read_config(0, 8))[0] == 2048
        finally:
            device.close()


@pytest.mark.parametrize(("configured", "expected"), [(None, 4), (2, 2), (1, 1)])
async def test_the_config_space_announces_the_queues_the_driver_gets(
    tmp_path: Path, configured: int | None, expected: int,
) -> None:
    sock = tmp_path / "be.sock"
    with scripted_backend(sock, features=VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES
                          | BLK_F_MQ, protocol_features=PROTOCOL_CONFIG | PROTOCOL_MQ,
                          queue_num=4, config=blk_config_space(num_queues=4)):
        device = await make_device(sock, device_id=DeviceId.BLOCK, num_queues=configured)
        try:
            assert len(device.queue_max_sizes) == expected
            num_queues = struct.unpack("<H", device.read_config(BLK_NUM_QUEUES, 2))[0]
            if expected > 1:
                assert device.device_features() & BLK_F_MQ
                assert num_queues == expected
            else:
                # One queue: no MQ (and a num_queues the driver cannot misread).
                assert not device.device_features() & BLK_F_MQ
                assert num_queues <= 1
        finally:
            device.close()


@pytest.mark.kvm
@pytest.mark.guest
async def test_multiqueue_blk_through_qemu_storage_daemon(tmp_path: Path) -> None:
    if shutil.which("qemu-storage-daemon") is None:
        require("qemu-storage-daemon is not installed (make deps installs qemu-system-x86)")
    image = random_image(tmp_path / "disk.img", 1 << 20)
    sock = tmp_path / "blk.sock"
    from tests.vhost.test_frontend import subprocess_backend

    with subprocess_backend(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=file,filename={image}",
             "--export", "type=vhost-user-blk,id=exp,node-name=file,addr.type=unix,"
             f"addr.path={sock},writable=on,num-queues=2"], sock):
        result, output, vm = await run(blk_config("avmm.test=blk-crc", sock))
    transport = vm.virtio_slots[0].transport
    assert f"blk0 sectors=2048 crc32={zlib.crc32(image.read_bytes()):08x}" in output, output
    assert result.reason is StopReason.RESET, (result, output)
    assert len(transport.queues) == 2
    assert transport.offered_features & BLK_F_MQ
    assert not transport.offered_features & BLK_F_CONFIG_WCE
    assert int.from_bytes(transport.read(0x100 + BLK_NUM_QUEUES, 2), "little") == 2


# -- B6: a reset completes only once the back-end has stopped -------------------------


@pytest.mark.parametrize("released", [True, False])
async def test_a_reset_waits_for_the_backend_to_confirm_the_rings_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, released: bool,
) -> None:
    """The back-end never answers GET_VRING_BASE: the reset does not complete (Status
    reads non-zero, the log says why) until the back-end closes its connection; and
    the VM can still be torn down while it never does."""
    monkeypatch.setattr("avmm.vhost.frontend.RING_TIMEOUT_S", 0.3)
    monkeypatch.setattr("avmm.vm_virtio.RESET_TIMEOUT_S", 2.0)
    sock = tmp_path / "be.sock"
    with scripted_backend(sock, features=VIRTIO_F_VERSION_1, answer_vring_base=False
                          ) as backend, capture_logs() as logs:
        with trio.fail_after(30):
            async with running_slot(sock, device_id=DeviceId.ENTROPY) as (_slot, driver):
                await in_thread(driver.bring_up, (0,))
                await in_thread(wait_until, lambda: backend.seen(Request.GET_FEATURES) >= 2,
                                20.0, "bring-up")
                await in_thread(driver.reset)
                assert backend.seen(Request.GET_VRING_BASE, 0) == 1
                await trio.sleep(0.3)
                assert driver.status == OK_STATUS  # still not reset
                assert any(entry.get("event", "").startswith("virtio reset waits")
                           for entry in logs), logs
                if released:
                    backend.release()
                    await in_thread(wait_until, lambda: driver.status == 0, 10.0,
                                    "the reset to complete")
                    # A new run starts on a new connection only after the old one.
                    assert backend.closed.is_set()
            # Not released: leaving the block tears the slot down regardless.
