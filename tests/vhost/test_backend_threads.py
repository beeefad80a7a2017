"""avmm's vhost-user back-end serves net and blk queues from I/O threads of their own
(the context's ``kick_fd``), as the in-process slot does; what a front-end may change
under running rings is made safe for them:

* a change of dirty logging (SET_LOG_BASE, VHOST_F_LOG_ALL, VHOST_VRING_F_LOG) stops
  and restarts the device, so no thread writes unlogged past the answer or marks a log
  that is being unmapped;
* SET_VRING_CALL with a new eventfd keeps the fd number (dup3), so a thread never
  writes a closed or reused number; an fd that appears or goes away restarts the device;
* a stop drops the queues' views of guest RAM on the event loop, so a replaced memory
  table is unmapped at once, not later by the next device thread (whose seccomp filter
  does not allow close).

Each device is served in this process and driven by the front-end double.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import trio
import trio.testing

from avmm.vhost.protocol import (
    VHOST_F_LOG_ALL,
    VHOST_VRING_F_LOG,
    VRING_NOFD,
    ProtocolFeature,
    Request,
)
from avmm.virtio.blk import BlockDevice
from avmm.virtio.device import DeviceContext
from avmm.virtio.net import NET_HEADER_SIZE, NetDevice
from avmm.virtio.rng import RngDevice

from .frontend_double import (
    REPLY_ACK,
    USER_BASE,
    MemfdMemory,
    connected,
    served,
    wait_for,
)
from .test_stop_start import MAC, PairTap, frame

PAGE = 4096
LOG_SHMFD = 1 << ProtocolFeature.LOG_SHMFD


def thread_names() -> set[str]:
    return {thread.name for thread in threading.enumerate()}


class CountingRng(RngDevice):
    """An rng that counts its starts (each ``run``)."""

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    async def run(self, context: DeviceContext) -> None:
        self.runs += 1
        await super().run(context)


async def settled() -> None:
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)


async def test_net_queues_are_served_by_threads_of_their_own(tmp_path: Path) -> None:
    """Both net queues run in threads named after the device and the direction while
    the rings run, a frame goes out and one comes in through them, and the threads are
    gone once the rings are stopped."""
    device_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with device_end, host_end:
        device = NetDevice(PairTap(device_end), mac=MAC, name="vnet7")
        async with served(device, tmp_path) as path, connected(path) as frontend:
            await frontend.handshake()
            rx, tx = frontend.add_ring(0), frontend.add_ring(1)
            rx.driver.add_chain(writable=[NET_HEADER_SIZE + 1514])
            await frontend.start()
            await wait_for(lambda: {"avmm vnet7 RX", "avmm vnet7 TX"} <= thread_names(),
                           "the queue threads")
            outgoing = frame(1)
            tx.driver.add_chain(readable=[bytes(NET_HEADER_SIZE) + outgoing])
            tx.kick()
            await tx.wait_used(1)
            # The pair "tap" takes and gives frames with their virtio-net header.
            assert host_end.recv(2048)[NET_HEADER_SIZE:] == outgoing
            host_end.send(bytes(NET_HEADER_SIZE) + frame(2))
            [(head, written)] = await rx.wait_used(1)
            assert rx.driver.writable_data(head, written)[NET_HEADER_SIZE:] == frame(2)
            await frontend.stop()
            await wait_for(lambda: not {"avmm vnet7 RX", "avmm vnet7 TX"} & thread_names(),
                           "the queue threads gone")


async def test_blk_queue_is_served_by_a_thread_of_its_own(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * 4096)
    device = BlockDevice(image, name="vblk7")
    async with served(device, tmp_path) as path, connected(path) as frontend:
        await frontend.handshake()
        frontend.add_ring(0)
        await frontend.start()
        await wait_for(lambda: "avmm vblk7 I/O" in thread_names(), "the queue thread")
        await frontend.stop()
        await wait_for(lambda: "avmm vblk7 I/O" not in thread_names(), "the thread gone")


async def test_a_change_of_dirty_logging_restarts_a_running_device(tmp_path: Path) -> None:
    """SET_LOG_BASE, SET_FEATURES toggling VHOST_F_LOG_ALL and SET_VRING_ADDR changing
    the log flag each restart the running device (the ring keeps working, its pages are
    logged); requests that leave logging as it was do not."""
    device = CountingRng()
    async with served(device, tmp_path) as path, connected(path) as frontend:
        await frontend.handshake(protocol=REPLY_ACK | LOG_SHMFD)
        ring = frontend.add_ring(0)
        driver = ring.driver
        await frontend.start()
        await wait_for(lambda: device.runs == 1, "the first start")
        log_area = MemfdMemory(PAGE)
        try:
            await frontend.send(Request.SET_LOG_BASE, {"mmap_size": PAGE,
                                                       "mmap_offset": 0}, [log_area.fd])
            assert (await frontend.receive()).payload == 0
            await wait_for(lambda: device.runs == 2, "a restart for the log")
            await frontend.set(Request.SET_FEATURES, frontend.features | VHOST_F_LOG_ALL)
            await wait_for(lambda: device.runs == 3, "a restart for VHOST_F_LOG_ALL")

            def address(flags: int) -> dict[str, int]:
                return {"index": 0, "flags": flags,
                        "descriptor": USER_BASE + driver.descriptor_table,
                        "used": USER_BASE + driver.used_ring,
                        "available": USER_BASE + driver.available_ring,
                        "log": driver.used_ring if flags else 0}

            await frontend.set(Request.SET_VRING_ADDR, address(VHOST_VRING_F_LOG))
            await wait_for(lambda: device.runs == 4, "a restart for VHOST_VRING_F_LOG")
            # Nothing about logging changes: no restart.
            await frontend.set(Request.SET_VRING_ADDR, address(VHOST_VRING_F_LOG))
            await frontend.set(Request.SET_FEATURES, frontend.features | VHOST_F_LOG_ALL)
            await settled()
            assert device.runs == 4
            head = driver.add_chain(writable=[PAGE])
            ring.kick()
            assert await ring.wait_used(1) == [(head, PAGE)]
            [(buffer, _)] = driver.chains[head].writable
            assert log_area.data[buffer // PAGE // 8] >> (buffer // PAGE % 8) & 1
        finally:
            log_area.close()


async def test_set_vring_call_under_a_running_device(tmp_path: Path) -> None:
    """A new call eventfd replaces the old one without a restart, and the next interrupt
    goes to it; taking the fd away (the no-fd bit) restarts the device, which goes on
    without interrupting."""
    device = CountingRng()
    new_call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        async with served(device, tmp_path) as path, connected(path) as frontend:
            await frontend.handshake()
            ring = frontend.add_ring(0)
            await frontend.start()
            await wait_for(lambda: device.runs == 1, "the first start")
            await frontend.set(Request.SET_VRING_CALL, 0, [new_call])
            await settled()
            assert device.runs == 1
            ring.calls()  # whatever the old fd got before the swap
            while True:  # the spurious interrupt the swap sends
                try:
                    os.eventfd_read(new_call)
                except BlockingIOError:
                    break
            ring.driver.add_chain(writable=[64])
            ring.kick()
            await ring.wait_used(1)
            with trio.fail_after(10):
                while not _pending(new_call):
                    await trio.sleep(0.005)
            assert ring.calls() == 0
            await frontend.set(Request.SET_VRING_CALL, VRING_NOFD)
            await wait_for(lambda: device.runs == 2, "a restart without a call fd")
            _pending(new_call)
            ring.driver.add_chain(writable=[64])
            ring.kick()
            await ring.wait_used(1)
            await settled()
            assert not _pending(new_call) and ring.calls() == 0
    finally:
        os.close(new_call)


def _pending(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _mappings_of(fd: int) -> int:
    inode = os.fstat(fd).st_ino
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if line.split()[4:5] == [str(inode)])


async def test_a_replaced_memory_table_is_unmapped_at_once(tmp_path: Path) -> None:
    """Once the rings have run and stopped, a new memory table unmaps the old RAM before
    the answer: no view the device's queue took keeps it mapped (it would go later, from
    the next device thread)."""
    async with served(RngDevice(), tmp_path) as path, connected(path) as frontend:
        await frontend.handshake()
        ring = frontend.add_ring(0)
        await frontend.start()
        ring.driver.add_chain(writable=[64])
        ring.kick()
        await ring.wait_used(1)
        own = _mappings_of(frontend.memory.fd)
        assert own >= 2  # the double's own and the back-end's
        await frontend.stop()
        other = MemfdMemory()
        try:
            await frontend.set_mem_table(other)
            assert _mappings_of(frontend.memory.fd) == own - 1
        finally:
            other.close()
