"""A scriptable vhost-user front-end for back-end tests.

:class:`Frontend` plays QEMU's part against an avmm back-end served in this process
(:func:`served`): guest RAM is a memfd (sealed against shrinking unless told otherwise)
mapped here, each ring is a :class:`~tests.virtio.queue_helpers.DriverQueue` in its own
window of that RAM, kicks and calls are eventfds, and every message is sent exactly as
the test says (:meth:`Frontend.send` writes raw messages, :meth:`Frontend.ack` asks for a
REPLY_ACK answer). The ring addresses handed over are "front-end virtual addresses"
:data:`USER_BASE` + guest address, as QEMU's would be.

Bring-up, stop and restart follow QEMU's order (docs/interop/vhost-user.rst): SET_OWNER,
GET_FEATURES, GET/SET_PROTOCOL_FEATURES, then at "DRIVER_OK" SET_FEATURES, SET_MEM_TABLE
and per ring SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK,
SET_VRING_CALL, SET_VRING_ENABLE; a stop is SET_VRING_ENABLE 0 and GET_VRING_BASE.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from avmm.memory import MemoryAccess
from avmm.vhost import backend
from avmm.vhost.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    Message,
    ProtocolFeature,
    Request,
    receive_message,
    send_message,
)
from avmm.virtio.device import VIRTIO_F_VERSION_1, VirtioDevice
from tests.virtio.queue_helpers import DriverQueue

#: Guest RAM of the tests: 8 MiB, each ring in its own 2 MiB window.
MEMORY_SIZE = 8 << 20
RING_WINDOW = 2 << 20
#: Where the rings of ring ``i`` start in its window, and where its buffers start.
RING_OFFSET = 0x1000
DATA_OFFSET = 0x10000
#: The front-end's "virtual address" of guest address 0.
USER_BASE = 0x7F00_0000_0000
#: How long a test waits for something the back-end should do at once.
WAIT_S = 10.0

REPLY_ACK = 1 << ProtocolFeature.REPLY_ACK


class MemfdMemory(MemoryAccess):
    """Guest RAM in a memfd, mapped shared; ``seals`` are added at once (0: none, so the
    front-end could shrink it under the back-end)."""

    def __init__(self, size: int = MEMORY_SIZE, *,
                 seals: int = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) -> None:
        self.size = size
        self.fd = os.memfd_create("avmm-test-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            if seals:
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals)
            self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.data = memoryview(self._map)

    def contains(self, address: int, length: int = 1) -> bool:
        return address >= 0 and length >= 0 and address + length <= self.size

    def view(self, address: int, length: int) -> memoryview:
        from avmm.errors import GuestAddressError

        if not self.contains(address, length):
            raise GuestAddressError(address, length)
        return self.data[address:address + length]

    def close(self) -> None:
        self.data.release()
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self.fd)

    def region(self) -> dict[str, int]:
        return {"guest_address": 0, "size": self.size, "user_address": USER_BASE,
                "mmap_offset": 0}


def signals(fd: int) -> int:
    """What a (non-blocking) eventfd counted since the last look, and reset it: 0 if
    nothing was signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@dataclass
class Ring:
    index: int
    driver: DriverQueue
    kick_fd: int
    call_fd: int

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def calls(self) -> int:
        """Interrupts signalled since the last look (0 if none)."""
        return signals(self.call_fd)

    async def wait_used(self, count: int, seen: list[tuple[int, int]] | None = None
                        ) -> list[tuple[int, int]]:
        """Used elements until ``count`` have come back (those in ``seen`` count)."""
        used = [] if seen is None else seen
        with trio.fail_after(WAIT_S):
            while True:
                used += self.driver.used()
                if len(used) >= count:
                    return used
                await trio.sleep(0.005)


class Frontend:
    """One connection to a back-end (see the module docstring)."""

    def __init__(self, sock: Any, memory: MemfdMemory) -> None:
        self.sock = sock
        self.memory = memory
        self.rings: dict[int, Ring] = {}
        self.features = 0
        self.protocol_features = 0

    # -- raw messages -------------------------------------------------------------------

    async def send(self, request: Request, payload: Any = None, fds: Sequence[int] = (),
                   *, need_reply: bool = False) -> None:
        await send_message(self.sock, Message(request, payload, need_reply=need_reply), fds)

    async def receive(self) -> Message:
        with trio.fail_after(WAIT_S):
            message = await receive_message(self.sock)
        message.close_fds()
        return message

    async def receive_with_fds(self) -> Message:
        """The next message, its fds left open for the caller (who closes them)."""
        with trio.fail_after(WAIT_S):
            return await receive_message(self.sock)

    async def get(self, request: Request, payload: Any = None) -> Any:
        """A request that has a reply body (GET_*): its reply's payload."""
        await self.send(request, payload)
        reply = await self.receive()
        assert reply.reply and reply.request == request, reply
        return reply.payload

    async def ack(self, request: Request, payload: Any = None, fds: Sequence[int] = ()
                  ) -> int:
        """Send with NEED_REPLY (REPLY_ACK must be negotiated); the reply's u64: 0 for
        success."""
        await self.send(request, payload, fds, need_reply=True)
        reply = await self.receive()
        assert reply.reply and reply.request == request, reply
        return int(reply.payload)

    async def set(self, request: Request, payload: Any = None, fds: Sequence[int] = ()
                  ) -> None:
        """Send a request that must succeed (acked when REPLY_ACK was negotiated)."""
        if self.protocol_features & REPLY_ACK:
            assert await self.ack(request, payload, fds) == 0, request.name
        else:
            await self.send(request, payload, fds)

    # -- bring-up -----------------------------------------------------------------------

    async def handshake(self, wanted: int = VIRTIO_F_VERSION_1,
                        protocol: int = REPLY_ACK) -> None:
        """SET_OWNER, GET_FEATURES and (when offered) GET/SET_PROTOCOL_FEATURES with
        ``protocol``; remembers the device features to ack: ``wanted`` & offered."""
        await self.send(Request.SET_OWNER)
        offered = await self.get(Request.GET_FEATURES)
        self.features = offered & wanted
        if offered & VHOST_USER_F_PROTOCOL_FEATURES and protocol is not None:
            self.features |= VHOST_USER_F_PROTOCOL_FEATURES
            available = await self.get(Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = available & protocol
            await self.send(Request.SET_PROTOCOL_FEATURES, self.protocol_features)

    def add_ring(self, index: int, size: int = 16) -> Ring:
        base = index * RING_WINDOW
        driver = DriverQueue(self.memory, size, base + RING_OFFSET,
                             data_address=base + DATA_OFFSET,
                             data_size=RING_WINDOW - DATA_OFFSET)
        ring = Ring(index, driver, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                    os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        self.rings[index] = ring
        return ring

    async def set_features(self) -> None:
        await self.set(Request.SET_FEATURES, self.features)

    async def set_mem_table(self, memory: MemfdMemory | None = None) -> None:
        memory = memory or self.memory
        await self.set(Request.SET_MEM_TABLE,
                       {"nregions": 1, "regions": [memory.region()]}, [memory.fd])

    async def start_ring(self, ring: Ring, base: int | None = None, *,
                         num: int | None = None) -> None:
        """Set up and start ``ring``; ``num`` (default: the ring's size) is what
        SET_VRING_NUM says, sent without asking for an answer if it is not the size."""
        driver = ring.driver
        if base is None:
            base = driver.used_idx  # a fresh ring: the device starts where used idx is
        if num is None:
            await self.set(Request.SET_VRING_NUM, {"index": ring.index, "num": driver.size})
        else:
            await self.send(Request.SET_VRING_NUM, {"index": ring.index, "num": num})
        await self.set(Request.SET_VRING_BASE, {"index": ring.index, "num": base})
        await self.set(Request.SET_VRING_ADDR, {
            "index": ring.index, "flags": 0,
            "descriptor": USER_BASE + driver.descriptor_table,
            "used": USER_BASE + driver.used_ring,
            "available": USER_BASE + driver.available_ring, "log": 0})
        await self.set(Request.SET_VRING_KICK, ring.index, [ring.kick_fd])
        await self.set(Request.SET_VRING_CALL, ring.index, [ring.call_fd])
        if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
            await self.set(Request.SET_VRING_ENABLE, {"index": ring.index, "num": 1})

    async def start(self, bases: dict[int, int] | None = None) -> None:
        """What QEMU does at DRIVER_OK (and at ``cont``): features, memory, rings."""
        await self.set_features()
        await self.set_mem_table()
        for index, ring in self.rings.items():
            await self.start_ring(ring, None if bases is None else bases[index])

    async def stop(self) -> dict[int, int]:
        """What QEMU does at ``stop``: disable and stop every ring; their bases."""
        bases = {}
        for index in self.rings:
            if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
                await self.set(Request.SET_VRING_ENABLE, {"index": index, "num": 0})
            state = await self.get(Request.GET_VRING_BASE, {"index": index, "num": 0})
            assert state.index == index
            bases[index] = state.num
        return bases

    def close(self) -> None:
        for ring in self.rings.values():
            os.close(ring.kick_fd)
            os.close(ring.call_fd)
        self.rings.clear()


@contextlib.asynccontextmanager
async def served(device: VirtioDevice, directory: Path, **options: Any
                 ) -> AsyncIterator[str]:
    """``device`` served by avmm's back-end at a socket in ``directory`` (in a task of
    this trio run); yields the socket path. ``options`` go to ``serve_device``."""
    path = str(directory / f"{device.name}.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(backend.serve_device, **options), device, path)
        try:
            yield path
        finally:
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def connected(path: str, memory: MemfdMemory | None = None
                    ) -> AsyncIterator[Frontend]:
    """A :class:`Frontend` connected to ``path`` (with fresh sealed RAM by default)."""
    own = memory is None
    memory = memory or MemfdMemory()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    frontend = Frontend(sock, memory)
    try:
        with sock:
            await sock.connect(path)
            yield frontend
    finally:
        frontend.close()
        if own:
            memory.close()


async def wait_for(condition: Callable[[], object], what: str) -> None:
    with trio.fail_after(WAIT_S):
        while not condition():
            await trio.sleep(0.005)
    assert condition(), what
