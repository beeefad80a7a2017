"""avmm's vhost-user back-end SDK and VHOST_USER_PROTOCOL_F_DEVICE_STATE, driven by the
front-end double: the state goes out only while the rings are stopped, comes in checked,
and a hostile front-end (too much state, a pipe it never closes, garbage, an fd that is
no pipe) gets a failure answer, never a hang or a crash; the connection stays usable."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from avmm.state import codec
from avmm.vhost import backend
from avmm.vhost.device_state import (
    MAX_DEVICE_STATE_SIZE,
    BackendState,
    BlockBackendState,
)
from avmm.vhost.protocol import ProtocolFeature, Request
from avmm.virtio.blk import BlockDevice
from avmm.virtio.device import DeviceId
from avmm.virtio.rng import RngDevice

from .frontend_double import Frontend, connected, served

REPLY_ACK = 1 << ProtocolFeature.REPLY_ACK
DEVICE_STATE = 1 << ProtocolFeature.DEVICE_STATE
NO_FD = 1 << 8
SAVE, LOAD = 0, 1
BLK_F_FLUSH = 1 << 9


def disk(tmp_path: Path, name: str = "disk.img", size: int = 1 << 20) -> BlockDevice:
    image = tmp_path / name
    image.write_bytes(bytes(size))
    return BlockDevice(image, name=name.split(".")[0])


async def set_state_fd(frontend: Frontend, direction: int, fd: int) -> int:
    """SET_DEVICE_STATE_FD with ``fd``; the reply's u64 (any fd in it is closed)."""
    await frontend.send(Request.SET_DEVICE_STATE_FD, {"direction": direction, "phase": 0},
                        [fd])
    reply = await frontend.receive()
    assert reply.reply and reply.request == Request.SET_DEVICE_STATE_FD
    return int(reply.payload)


async def check(frontend: Frontend) -> int:
    return int(await frontend.get(Request.CHECK_DEVICE_STATE))


async def save(frontend: Frontend) -> bytes:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        assert await set_state_fd(frontend, SAVE, write_end) == NO_FD
        os.close(write_end)
        write_end = -1
        data = await trio.to_thread.run_sync(_read_all, read_end)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert await check(frontend) == 0
    return data


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def load(frontend: Frontend, data: bytes, *, close: bool = True) -> tuple[int, int]:
    """LOAD ``data``; the SET_DEVICE_STATE_FD answer and CHECK_DEVICE_STATE's (the
    pipe is left open when not ``close``: the check must still come back)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        answer = await set_state_fd(frontend, LOAD, read_end)
        os.close(read_end)
        read_end = -1
        writer = threading.Thread(target=_write_all, args=(write_end, data), daemon=True)
        writer.start()
        if close:
            await trio.to_thread.run_sync(writer.join)
            os.close(write_end)
            write_end = -1
        with trio.fail_after(backend.TRANSFER_TIMEOUT_S * 3):
            status = await check(frontend)
        return answer, status
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass  # the back-end stopped reading: it gave up, as it should


async def test_the_state_goes_out_only_while_the_rings_are_stopped(tmp_path: Path) -> None:
    device = disk(tmp_path)
    with device:
        async with served(device, tmp_path) as path, connected(path) as frontend:
            await frontend.handshake(protocol=REPLY_ACK | DEVICE_STATE)
            assert frontend.protocol_features & DEVICE_STATE
            frontend.features |= BLK_F_FLUSH
            frontend.add_ring(0)
            await frontend.start()
            await trio.sleep(0.05)
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            try:
                answer = await set_state_fd(frontend, SAVE, write_end)
            finally:
                os.close(write_end)
                os.close(read_end)
            assert answer & 0xFF and answer & NO_FD  # refused, and no fd with it
            await frontend.stop()
            data = await save(frontend)
    state = codec.decode(data, BackendState)
    block = codec.decode(state.device, BlockBackendState)
    assert state.kind == "blk" and state.features & BLK_F_FLUSH
    assert block.serial == device.serial and block.writeback
    assert block.capacity == device.capacity


async def test_a_loaded_state_is_checked_then_applied(tmp_path: Path) -> None:
    source, target = disk(tmp_path, "a.img"), disk(tmp_path, "b.img")
    bigger = disk(tmp_path, "c.img", size=2 << 20)
    with source, target, bigger:
        source.stats.reads = 41
        async with served(source, tmp_path) as path, connected(path) as frontend:
            await frontend.handshake(protocol=REPLY_ACK | DEVICE_STATE)
            data = await save(frontend)
        async with served(bigger, tmp_path) as path, connected(path) as frontend:
            await frontend.handshake(protocol=REPLY_ACK | DEVICE_STATE)
            assert await load(frontend, data) == (NO_FD, 1)  # another disk: refused
            assert bigger.serial != source.serial and bigger.stats.reads == 0
        async with served(target, tmp_path) as path, connected(path) as frontend:
            await frontend.handshake(protocol=REPLY_ACK | DEVICE_STATE)
            assert target.serial != source.serial
            assert await load(frontend, data) == (NO_FD, 0)
            assert target.serial == source.serial and target.stats.reads == 41


@pytest.mark.parametrize("case", ["too_big", "never_closed", "garbage", "not_a_pipe",
                                  "check_without_transfer"])
async def test_a_hostile_load_gets_a_failure_and_the_connection_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str,
) -> None:
    monkeypatch.setattr(backend, "TRANSFER_TIMEOUT_S", 0.5)
    device = disk(tmp_path)
    serial = device.serial
    with device:
        async with served(device, tmp_path) as path, connected(path) as frontend:
            await frontend.handshake(protocol=REPLY_ACK | DEVICE_STATE)
            if case == "too_big":
                answer, status = await load(frontend, bytes(MAX_DEVICE_STATE_SIZE + 4096))
            elif case == "never_closed":
                answer, status = await load(frontend, b"\x07" * 10, close=False)
            elif case == "garbage":
                answer, status = await load(frontend, os.urandom(300))
            elif case == "not_a_pipe":
                fd = os.eventfd(0, os.EFD_CLOEXEC)
                try:
                    answer = await set_state_fd(frontend, LOAD, fd)
                finally:
                    os.close(fd)
                status = await check(frontend)
            else:
                answer, status = NO_FD, await check(frontend)
            assert status != 0
            if case == "not_a_pipe":
                assert answer & 0xFF
            else:
                assert answer == NO_FD
            # Nothing was applied, and the connection is still in step.
            assert device.serial == serial
            assert await frontend.get(Request.GET_FEATURES) & (1 << 30)
            assert await save(frontend)


async def test_a_device_with_its_own_state_class_takes_part(tmp_path: Path) -> None:
    """Any device with save_state/restore_state/state_class (here rng) travels as kind
    "device": its own state class, checked by its own restore_state."""
    source, target = RngDevice(), RngDevice()
    async with served(source, tmp_path) as path, connected(path) as frontend:
        await frontend.handshake(protocol=REPLY_ACK | DEVICE_STATE)
        data = await save(frontend)
    state = codec.decode(data, BackendState)
    assert state.kind == "device" and state.device_id == DeviceId.ENTROPY
    assert codec.decode(state.device, RngDevice.state_class) == source.save_state()
    async with served(target, tmp_path) as path, connected(path) as frontend:
        await frontend.handshake(protocol=REPLY_ACK | DEVICE_STATE)
        assert await load(frontend, data) == (NO_FD, 0)
        # A blk state is not an rng's.
        with disk(tmp_path, "x.img", 4096) as disk_device:
            async with served(disk_device, tmp_path) as blk_path, \
                    connected(blk_path) as blk_frontend:
                await blk_frontend.handshake(protocol=REPLY_ACK | DEVICE_STATE)
                blk_data = await save(blk_frontend)
        assert await load(frontend, blk_data) == (NO_FD, 1)
