"""Stop and restart the rings of avmm's vhost-user back-end, as QEMU does at ``stop`` /
``cont`` (and avmm's front-end at a pause or reconnect): every buffer the driver posted
must still be usable afterwards, whatever the device held at the stop.

Each device is served in this process and driven by the front-end double: buffers are
posted, the rings are stopped (GET_VRING_BASE) and restarted (SET_VRING_BASE with what
GET_VRING_BASE answered) several times while the device holds some of them, and then
every buffer must come back exactly once, with the right contents.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from avmm.virtio.blk import SECTOR_SIZE, BlockDevice, RequestType, Status
from avmm.virtio.console import ConsoleDevice
from avmm.virtio.device import DeviceContext, DeviceId, VirtioDevice, serve_queue
from avmm.virtio.net import NET_HEADER_SIZE, NetDevice
from avmm.virtio.queue import DescriptorChain
from avmm.virtio.rng import RngDevice
from benchmarks import qmp
from tests.virtio_guest_support import echoing_tap

from .frontend_double import Frontend, connected, served
from .test_frontend import avmm_backend

CYCLES = 3
MAC = bytes.fromhex("02aa00000042")
_BLK_HEADER = struct.Struct("<IIQ")


class PairTap:
    """A tap stand-in: one end of a datagram socket pair (one frame per read/write)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.fd = sock.fileno()
        self.name = "pair-tap"


def frame(number: int, size: int = 100) -> bytes:
    """An Ethernet frame with its number in the payload."""
    return MAC + MAC + b"\x88\xb5" + number.to_bytes(4, "little") + bytes(size - 18)


async def cycle(frontend: Frontend, cycles: int = CYCLES) -> None:
    """Stop and restart every ring ``cycles`` times, each time once the device has done
    all it can (taken what it takes, and blocked)."""
    for _ in range(cycles):
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        bases = await frontend.stop()
        await frontend.start(bases)


# -- net ------------------------------------------------------------------------------


async def test_net_receive_buffers_survive_stop_start(tmp_path: Path) -> None:
    """The issue's case: 4 receive buffers, 3 stop/start cycles, then 4 frames: all 4
    arrive (the device always holds a receive buffer while it waits for the tap)."""
    device_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with device_end, host_end:
        device = NetDevice(PairTap(device_end), mac=MAC)
        async with served(device, tmp_path) as path, connected(path) as frontend:
            await frontend.handshake()
            rx, _tx = frontend.add_ring(0), frontend.add_ring(1)
            heads = [rx.driver.add_chain(writable=[NET_HEADER_SIZE + 1514]) for _ in range(4)]
            await frontend.start()
            await cycle(frontend)
            frames = [frame(n) for n in range(4)]
            for data in frames:
                host_end.send(bytes(NET_HEADER_SIZE) + data)
            used = await rx.wait_used(4)
            received = [rx.driver.writable_data(head, length)[NET_HEADER_SIZE:]
                        for head, length in used]
    assert sorted(head for head, _ in used) == sorted(heads)
    assert received == frames
    assert device.stats.rx_frames == 4 and device.stats.rx_dropped == 0


async def test_net_transmit_chain_waiting_for_the_tap_survives_stop_start(
    tmp_path: Path,
) -> None:
    """A frame the tap could not take yet (its queue full) is sent after the restart,
    not dropped with the cancelled task."""
    device_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with device_end, host_end:
        device_end.setblocking(False)
        filler = 0
        try:  # fill the "tap": the host reads nothing until the end
            while True:
                device_end.send(b"F" * 1000)
                filler += 1
        except BlockingIOError:
            pass
        device = NetDevice(PairTap(device_end), mac=MAC)
        async with served(device, tmp_path) as path, connected(path) as frontend:
            await frontend.handshake()
            _rx, tx = frontend.add_ring(0), frontend.add_ring(1)
            frames = [frame(n, 200) for n in range(3)]
            heads = [tx.driver.add_chain([bytes(NET_HEADER_SIZE) + data]) for data in frames]
            await frontend.start()
            await cycle(frontend)
            assert tx.driver.used() == []  # nothing could be sent yet
            host_end.setblocking(False)
            sent = []
            with trio.fail_after(10):
                while len(sent) < filler + len(frames):
                    try:
                        sent.append(host_end.recv(4096))
                    except BlockingIOError:
                        await trio.sleep(0.005)
            used = await tx.wait_used(3)
    assert [data[NET_HEADER_SIZE:] for data in sent[filler:]] == frames
    assert sorted(head for head, _ in used) == sorted(heads)
    assert device.stats.tx_frames == 3 and device.stats.tx_dropped == 0


# -- blk ------------------------------------------------------------------------------


async def test_blk_requests_survive_stop_start(tmp_path: Path) -> None:
    """Requests made available before and between stops are each completed once, with
    the data on the disk and in the buffers; none is lost or done twice."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * SECTOR_SIZE))
    device = BlockDevice(image)
    pattern = [os.urandom(SECTOR_SIZE) for _ in range(8)]
    try:
        async with served(device, tmp_path) as path, connected(path) as frontend:
            await frontend.handshake()
            ring = frontend.add_ring(0, 64)
            writes = {ring.driver.add_chain([_BLK_HEADER.pack(RequestType.OUT, 0, n),
                                             pattern[n]], [1]): n for n in range(4)}
            await frontend.start()
            await cycle(frontend, 1)
            writes.update({ring.driver.add_chain([_BLK_HEADER.pack(RequestType.OUT, 0, n),
                                                  pattern[n]], [1]): n for n in range(4, 8)})
            ring.kick()
            await cycle(frontend, 2)
            used = await ring.wait_used(8)
            reads = {ring.driver.add_chain([_BLK_HEADER.pack(RequestType.IN, 0, n)],
                                           [SECTOR_SIZE, 1]): n for n in range(8)}
            ring.kick()
            await cycle(frontend, 1)
            read_back = await ring.wait_used(8, [])
            statuses = [ring.driver.writable_data(head) for head in writes]
            data = {n: ring.driver.writable_data(head) for head, n in reads.items()}
    finally:
        device.close()
    assert sorted(head for head, _ in used) == sorted(writes)
    assert all(length == 1 for _, length in used)
    assert statuses == [bytes([Status.OK])] * 8
    assert image.read_bytes()[:8 * SECTOR_SIZE] == b"".join(pattern)
    assert sorted(head for head, _ in read_back) == sorted(reads)
    assert data == {n: pattern[n] + bytes([Status.OK]) for n in range(8)}
    assert device.stats.writes == 8 and device.stats.reads == 8


# -- rng ------------------------------------------------------------------------------


async def test_rng_buffers_survive_stop_start(tmp_path: Path) -> None:
    device = RngDevice()
    async with served(device, tmp_path) as path, connected(path) as frontend:
        await frontend.handshake()
        ring = frontend.add_ring(0)
        heads = [ring.driver.add_chain(writable=[64]) for _ in range(4)]
        await frontend.start()
        await cycle(frontend)
        heads += [ring.driver.add_chain(writable=[64]) for _ in range(4)]
        ring.kick()
        await cycle(frontend)
        used = await ring.wait_used(8)
    assert sorted(head for head, _ in used) == sorted(heads)
    assert all(length == 64 for _, length in used)
    assert device.stats.requests == 8


# -- console --------------------------------------------------------------------------


async def test_console_buffers_and_input_survive_stop_start(tmp_path: Path) -> None:
    output = bytearray()
    device = ConsoleDevice(output=output.extend)
    async with served(device, tmp_path) as path, connected(path) as frontend:
        await frontend.handshake()
        receive, transmit = frontend.add_ring(0), frontend.add_ring(1)
        await frontend.start()
        # Input before any receive buffer: it waits in the device across the stops.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.send_input, b"early ")
            await cycle(frontend)
            first = receive.driver.add_chain(writable=[64])
            receive.kick()
            await receive.wait_used(1)
        heads = [receive.driver.add_chain(writable=[64]) for _ in range(3)]
        receive.kick()
        await cycle(frontend)
        for n in range(3):
            await device.send_input(f"line{n} ".encode())
        used = await receive.wait_used(3, [])
        out = transmit.driver.add_chain([b"hello from the guest"])
        await cycle(frontend)
        transmit.kick()
        transmit_used = await transmit.wait_used(1)
        early = receive.driver.writable_data(first, 6)
        lines = [receive.driver.writable_data(head, length) for head, length in used]
    assert early == b"early "
    assert sorted(head for head, _ in used) == sorted(heads)
    assert lines == [b"line0 ", b"line1 ", b"line2 "]
    assert transmit_used == [(out, 0)]
    assert bytes(output) == b"hello from the guest"


# -- a device written with the SDK (serve_queue) --------------------------------------


class SlowDevice(VirtioDevice):
    """A device whose handler takes each chain and waits until the test releases it:
    a stop always finds it holding one."""

    device_id = DeviceId.ENTROPY
    queue_max_sizes = (16,)
    name = "slow0"

    def __init__(self) -> None:
        self.release = trio.Event()
        self.taken: list[int] = []

    def device_features(self) -> int:
        return 0

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def run(self, context: DeviceContext) -> None:
        async def handle(chain: DescriptorChain) -> int:
            self.taken.append(chain.head)
            await self.release.wait()
            return chain.write(context.memory, chain.head.to_bytes(1, "little") * 8)

        await serve_queue(context, 0, handle)


async def test_serve_queue_gives_back_the_chain_its_handler_held(tmp_path: Path) -> None:
    device = SlowDevice()
    async with served(device, tmp_path) as path, connected(path) as frontend:
        await frontend.handshake()
        ring = frontend.add_ring(0)
        heads = [ring.driver.add_chain(writable=[8]) for _ in range(4)]
        await frontend.start()
        await cycle(frontend)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        # Every stop found the handler holding the first chain, which went back each time.
        assert device.taken == [heads[0]] * (CYCLES + 1)
        device.release.set()
        used = await ring.wait_used(4)
        contents = [ring.driver.writable_data(head) for head in heads]
    assert [head for head, _ in used] == heads
    assert contents == [bytes([head]) * 8 for head in heads]


# -- QEMU's stop/cont, with a guest echoing frames -----------------------------------

#: Frames the guest echoes while QEMU is stopped and continued underneath it: enough to
#: outlast the cycles (about 4 s here), and cycles enough to use up all 16 of its
#: receive buffers if each stop lost the one the back-end holds.
ECHO_FRAMES = 50_000
QEMU_CYCLES = 30


@pytest.mark.qemu
@pytest.mark.guest
@pytest.mark.net
def test_qemu_stop_cont_under_a_guest_echoing_frames(test_guest: Path, tmp_path: Path) -> None:
    """QEMU (vhost-user-net front-end) is stopped and continued while the test guest
    echoes frames through ``avmm backend net``: every stop is a GET_VRING_BASE, every
    cont a restart, and the guest must still get every echo."""
    sock, qmp_path = tmp_path / "net.sock", tmp_path / "qmp.sock"
    with echoing_tap() as (namespace, _echoer), \
            avmm_backend("net", sock, "--tap", namespace.tap, prefix=namespace.command_prefix()):
        argv = [
            "qemu-system-x86_64", "-M", "microvm,accel=tcg,acpi=off,memory-backend=mem",
            "-m", "64", "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
            "-smp", "1", "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0x501,iosize=2", "-device", "i8042",
            "-global", "virtio-mmio.force-legacy=false", "-kernel", str(test_guest),
            "-append", f"avmm.test=net-echo avmm.n={ECHO_FRAMES}",
            "-chardev", f"socket,id=vu,path={sock}", "-netdev", "vhost-user,id=n0,chardev=vu",
            "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
        ]  # fmt: skip
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            cycles = 0
            with qmp.connect(qmp_path, qemu) as monitor:
                while qemu.poll() is None and cycles < QEMU_CYCLES:
                    time.sleep(0.01)
                    monitor.command("stop")
                    monitor.command("cont")
                    cycles += 1
            stdout, stderr = qemu.communicate(timeout=120)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.communicate()
    output = stdout.decode(errors="replace")
    assert cycles == QEMU_CYCLES, f"the guest finished after {cycles} cycles: {output}"
    assert f"net0 echoed={ECHO_FRAMES}" in output, (output, stderr.decode()[-2000:])
