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
from typing import Any

import pytest
import trio
import trio.testing

from avmm.threads import run_in_own_thread
from avmm.vhost import backend
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
    WAIT_S,
    MemfdMemory,
    connected,
    served,
    signals,
    wait_for,
)
from .test_stop_start import MAC, PairTap, frame

PAGE = 4096
LOG_SHMFD = 1 << ProtocolFeature.LOG_SHMFD


def thread_names() -> set[str]:
    return {thread.name for thread in threading.enumerate()}


class CountingNet(NetDevice):
    """A net device (queues on threads) that counts its starts (each ``run``)."""

    def __init__(self, tap: PairTap) -> None:
        super().__init__(tap, mac=MAC)
        self.runs = 0

    async def run(self, context: DeviceContext) -> None:
        self.runs += 1
        await super().run(context)


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The back-end's sessions, as they are created (to look at a ring's fds)."""
    created: list[Any] = []

    class Recorded(backend._Session):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(backend, "_Session", Recorded)
    return created


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
    """With VHOST_F_LOG_ALL on, SET_LOG_BASE and SET_VRING_ADDR changing the log flag
    each restart the running net device (its queue threads), and a frame received after
    is logged; requests that leave what the queues log as it was do not restart it."""
    device_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with device_end, host_end:
        device = CountingNet(PairTap(device_end))
        async with served(device, tmp_path) as path, connected(path) as frontend:
            await frontend.handshake(protocol=REPLY_ACK | LOG_SHMFD)
            rx, _tx = frontend.add_ring(0), frontend.add_ring(1)
            driver = rx.driver
            await frontend.start()
            await wait_for(lambda: device.runs == 1, "the first start")
            # VHOST_F_LOG_ALL without a log yet: nothing is logged either way.
            await frontend.set(Request.SET_FEATURES, frontend.features | VHOST_F_LOG_ALL)
            await settled()
            assert device.runs == 1
            logs = [MemfdMemory(PAGE), MemfdMemory(PAGE)]
            try:
                for number, log_area in enumerate(logs):
                    await frontend.send(Request.SET_LOG_BASE,
                                        {"mmap_size": PAGE, "mmap_offset": 0},
                                        [log_area.fd])
                    assert (await frontend.receive()).payload == 0
                    await wait_for(lambda n=number: device.runs == 2 + n,
                                   "a restart for the log")

                def address(flags: int) -> dict[str, int]:
                    return {"index": 0, "flags": flags,
                            "descriptor": USER_BASE + driver.descriptor_table,
                            "used": USER_BASE + driver.used_ring,
                            "available": USER_BASE + driver.available_ring,
                            "log": driver.used_ring if flags else 0}

                await frontend.set(Request.SET_VRING_ADDR, address(VHOST_VRING_F_LOG))
                await wait_for(lambda: device.runs == 4, "a restart for VHOST_VRING_F_LOG")
                await frontend.set(Request.SET_VRING_ADDR, address(VHOST_VRING_F_LOG))
                await frontend.set(Request.SET_FEATURES,
                                   frontend.features | VHOST_F_LOG_ALL)
                await settled()
                assert device.runs == 4
                head = driver.add_chain(writable=[NET_HEADER_SIZE + 1514])
                rx.kick()
                host_end.send(bytes(NET_HEADER_SIZE) + frame(3))
                [(used_head, _)] = await rx.wait_used(1)
                assert used_head == head
                [(buffer, _)] = driver.chains[head].writable
                current = logs[1].data
                for page in (buffer // PAGE, driver.used_ring // PAGE):
                    assert current[page // 8] >> (page % 8) & 1, page
                assert logs[0].data[:PAGE] == bytes(PAGE)  # the old log: untouched
            finally:
                for log_area in logs:
                    log_area.close()


async def test_set_vring_call_under_running_queue_threads(tmp_path: Path,
                                                          sessions: list[Any]) -> None:
    """A new call eventfd replaces the old one under the running queue threads without
    a restart, under the same fd number, and the next interrupt goes to it; taking the
    fd away (the no-fd bit) restarts the device, which goes on without interrupting."""
    device_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    new_call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        with device_end, host_end:
            device = CountingNet(PairTap(device_end))
            async with served(device, tmp_path) as path, connected(path) as frontend:
                await frontend.handshake()
                frontend.add_ring(0)
                tx = frontend.add_ring(1)
                await frontend.start()
                await wait_for(lambda: device.runs == 1, "the first start")
                [session] = sessions
                number = session.rings[1].call_fd
                await frontend.set(Request.SET_VRING_CALL, 1, [new_call])
                await settled()
                assert device.runs == 1 and session.rings[1].call_fd == number
                tx.calls()  # whatever the old fd got before the swap
                signals(new_call)  # the spurious interrupt the swap sends
                tx.driver.add_chain(readable=[bytes(NET_HEADER_SIZE) + frame(1)])
                tx.kick()
                await tx.wait_used(1)
                with trio.fail_after(10):
                    while not signals(new_call):
                        await trio.sleep(0.005)
                assert tx.calls() == 0
                await frontend.set(Request.SET_VRING_CALL, 1 | VRING_NOFD)
                await wait_for(lambda: device.runs == 2, "a restart without a call fd")
                assert session.rings[1].call_fd == -1
                # Still none: nothing changes, no restart.
                await frontend.set(Request.SET_VRING_CALL, 1 | VRING_NOFD)
                signals(new_call)
                tx.driver.add_chain(readable=[bytes(NET_HEADER_SIZE) + frame(2)])
                tx.kick()
                await tx.wait_used(1)
                await settled()
                assert device.runs == 2
                assert not signals(new_call) and tx.calls() == 0
                assert len(host_end.recv(2048)) and len(host_end.recv(2048))
    finally:
        os.close(new_call)


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


class StuckDevice(RngDevice):
    """A device whose thread finishes its "batch" only when the test says so, and then
    looks whether guest RAM is still mapped."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.saw_memory: bool | None = None

    async def run(self, context: DeviceContext) -> None:
        memory = context.memory
        queue = context.queues[0]
        assert queue is not None

        def batch() -> None:
            queue.pop(memory)  # takes a chain, and views of the ring in guest RAM
            self.entered.set()
            self.release.wait(WAIT_S)
            self.saw_memory = memory.contains(0, 1)

        await run_in_own_thread(batch, on_cancel=lambda: None, name="avmm stuck")


async def test_a_device_that_does_not_stop_in_time_keeps_what_it_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A queue thread still in its batch when the stop times out (twice: at the request
    and again when the connection closes): the connection is dropped, but guest RAM is
    released only once the thread is done, and then at once (the chain it held given
    back, the queue's views of the ring dropped), not whenever they are collected."""
    monkeypatch.setattr(backend, "STOP_TIMEOUT_S", 0.1)
    device = StuckDevice()
    async with served(device, tmp_path) as path, connected(path) as frontend:
        await frontend.handshake()
        ring = frontend.add_ring(0)
        ring.driver.add_chain(writable=[64])
        await frontend.start()
        await wait_for(device.entered.is_set, "the batch under way")
        mapped = _mappings_of(frontend.memory.fd)
        await frontend.send(Request.GET_VRING_BASE, {"index": 0, "num": 0})
        await trio.sleep(0.5)  # well past both stops' time-outs
        assert _mappings_of(frontend.memory.fd) == mapped
        device.release.set()
        await wait_for(lambda: device.saw_memory is not None, "the batch's end")
        assert device.saw_memory is True
        await wait_for(lambda: _mappings_of(frontend.memory.fd) == mapped - 1,
                       "the back-end's mapping of guest RAM gone")
