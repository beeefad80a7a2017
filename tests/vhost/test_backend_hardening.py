"""avmm's vhost-user back-end against front-ends that ask for what it cannot do, hand it
the wrong fds, shrinkable memory, or nothing at all: refusals are answered (REPLY_ACK,
an empty GET_CONFIG) and the connection stays usable; only protocol breaks and idle
clients are dropped, and the log says who. Raw messages through the front-end double,
and QEMU where its behaviour matters (``queue-size=1024``)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from avmm.vhost import backend as backend_module
from avmm.vhost.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_NOFD,
    Request,
    VhostRequestRefused,
)
from avmm.virtio.blk import BlockDevice
from avmm.virtio.device import VIRTIO_F_VERSION_1
from avmm.virtio.net import NetDevice
from avmm.virtio.rng import RngDevice

from .frontend_double import (
    MEMORY_SIZE,
    REPLY_ACK,
    WAIT_S,
    Frontend,
    MemfdMemory,
    connected,
    served,
)
from .test_backend_linux import READY, run_linux
from .test_backend_linux import initramfs as initramfs  # the fixture the Linux test uses
from .test_backend_linux import vhost_device as linux_vhost_device
from .test_backend_qemu import backend as cli_backend

REPO = Path(__file__).resolve().parents[2]
NACK = 1


async def _rng_ready(frontend: Frontend) -> None:
    """Handshake with REPLY_ACK and one 16-entry ring, not started."""
    await frontend.handshake()
    assert frontend.protocol_features & REPLY_ACK
    frontend.add_ring(0)


async def _serves_a_request(frontend: Frontend) -> None:
    """Start the rng's ring (if not yet) and check a buffer comes back filled."""
    ring = frontend.rings[0]
    head = ring.driver.add_chain(writable=[32])
    ring.kick()
    used = await ring.wait_used(1)
    assert used == [(head, 32)]


# -- B3: refusals are answered, and the connection stays ------------------------------


async def test_refused_requests_are_answered_and_the_connection_stays(
    tmp_path: Path,
) -> None:
    async with served(RngDevice(), tmp_path) as path, connected(path) as frontend:
        await _rng_ready(frontend)
        ring = frontend.rings[0]
        # Above the device's maximum (QEMU's queue-size=512 on a 256-entry device),
        # not a power of two, a ring that does not exist.
        assert await frontend.ack(Request.SET_VRING_NUM, {"index": 0, "num": 512}) == NACK
        assert await frontend.ack(Request.SET_VRING_NUM, {"index": 0, "num": 24}) == NACK
        assert await frontend.ack(Request.SET_VRING_NUM, {"index": 3, "num": 16}) == NACK
        # Polling instead of a kick fd.
        assert await frontend.ack(Request.SET_VRING_KICK, VRING_NOFD | 0) == NACK
        # A config read past the 256-byte config space: an empty payload.
        await frontend.send(Request.GET_CONFIG,
                            {"offset": 250, "size": 10, "payload": bytes(10)})
        with pytest.raises(VhostRequestRefused, match="GET_CONFIG answered with an empty"):
            await frontend.receive()
        # And the connection still works: the device starts and serves.
        await frontend.start()
        await _serves_a_request(frontend)
        assert ring.driver.avail_idx == 1


async def test_a_refused_setting_keeps_the_device_from_starting(tmp_path: Path) -> None:
    """A front-end that does not ask for answers cannot get the device running on a
    ring size it was refused: it starts once a valid one replaces it."""
    device = RngDevice()
    async with served(device, tmp_path) as path, connected(path) as frontend:
        await frontend.handshake(protocol=0)  # no REPLY_ACK: refusals go unanswered
        ring = frontend.add_ring(0)
        await frontend.set_features()
        await frontend.set_mem_table()
        head = ring.driver.add_chain(writable=[32])
        await frontend.start_ring(ring, num=4096)  # refused, and no answer asked for
        ring.kick()
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        assert ring.driver.used() == [] and device.stats.requests == 0
        await frontend.send(Request.SET_VRING_NUM, {"index": 0, "num": 16})
        assert await ring.wait_used(1) == [(head, 32)]


@pytest.mark.parametrize("kind", ["blk", "net"])
async def test_blk_and_net_accept_rings_of_1024(tmp_path: Path, kind: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    device = (BlockDevice(image, queue_size=1024) if kind == "blk" else
              NetDevice(_Tap(pair[0]), mac=bytes.fromhex("02aa00000043"), queue_size=1024))
    try:
        async with served(device, tmp_path) as path, connected(path) as frontend:
            await frontend.handshake()
            assert await frontend.ack(Request.SET_VRING_NUM, {"index": 0, "num": 1024}) == 0
            assert await frontend.ack(Request.SET_VRING_NUM,
                                      {"index": 0, "num": 2048}) == NACK
    finally:
        for end in pair:
            end.close()
        if isinstance(device, BlockDevice):
            device.close()


class _Tap:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.fd = sock.fileno()
        self.name = "pair-tap"


@pytest.mark.qemu
@pytest.mark.debian_kernel
def test_linux_over_qemu_vhost_user_blk_with_queue_size_1024(
    debian_kernel: Path, initramfs: Path, tmp_path: Path,
) -> None:
    """QEMU's ``queue-size=1024``: Linux sets its ring up with QEMU's maximum, so the
    back-end gets SET_VRING_NUM 1024."""
    image = tmp_path / "disk.img"
    data = os.urandom(2 << 20)
    image.write_bytes(data)
    sock = tmp_path / "blk.sock"
    with cli_backend("blk", sock, "--image", str(image), "--readonly") as process:
        devices = linux_vhost_device("vhost-user-blk-pci", sock)
        devices[-1] += ",queue-size=1024"
        boot = run_linux(debian_kernel, initramfs, "blk-read", devices)
    expected = f"avmm-linux: vda sha256={hashlib.sha256(data).hexdigest()} bytes={len(data)}"
    assert boot.lines == [READY, expected, "avmm-linux: exit=0"], (
        boot.output[-4000:], process.stderr_text)  # type: ignore[attr-defined]


# -- B4: modern drivers only ----------------------------------------------------------


async def test_features_without_version_1_are_refused(tmp_path: Path) -> None:
    device = RngDevice()
    async with served(device, tmp_path) as path, connected(path) as frontend:
        await _rng_ready(frontend)
        legacy = frontend.features & ~VIRTIO_F_VERSION_1
        assert await frontend.ack(Request.SET_FEATURES, legacy) == NACK
        # Features that were never offered: refused too, without a hang-up.
        assert await frontend.ack(Request.SET_FEATURES,
                                  frontend.features | (1 << 40)) == NACK
        await frontend.set_mem_table()
        await frontend.start_ring(frontend.rings[0])
        frontend.rings[0].driver.add_chain(writable=[32])
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        assert device.stats.requests == 0  # not started on features it refused
        await frontend.set_features()  # with VERSION_1
        assert await frontend.rings[0].wait_used(1)


# -- B7: the first call fd is signalled once ------------------------------------------


async def test_call_fd_installed_after_the_ring_started_is_signalled(tmp_path: Path) -> None:
    """Without protocol features a ring starts at SET_VRING_KICK, which QEMU sends
    before SET_VRING_CALL: a buffer completed in between must still interrupt."""
    async with served(RngDevice(), tmp_path) as path, connected(path) as frontend:
        await frontend.handshake(protocol=None)
        assert not frontend.features & VHOST_USER_F_PROTOCOL_FEATURES
        ring = frontend.add_ring(0)
        head = ring.driver.add_chain(writable=[32])
        await frontend.start()  # ... SET_VRING_KICK, then SET_VRING_CALL
        with trio.fail_after(WAIT_S):
            await trio.lowlevel.wait_readable(ring.call_fd)
        assert ring.calls() >= 1
        assert ring.driver.used() == [(head, 32)]


# -- B8: memory that could shrink under the back-end ----------------------------------


async def test_unsealed_or_short_memory_is_refused(tmp_path: Path) -> None:
    unsealed = MemfdMemory(seals=0)
    short = MemfdMemory(MEMORY_SIZE // 2)
    read, write = os.pipe()
    try:
        async with served(RngDevice(), tmp_path) as path, connected(path) as frontend:
            await _rng_ready(frontend)
            table = {"nregions": 1, "regions": [frontend.memory.region()]}
            assert await frontend.ack(Request.SET_MEM_TABLE, table, [unsealed.fd]) == NACK
            # A file smaller than the region: every access past its end is a SIGBUS.
            assert await frontend.ack(Request.SET_MEM_TABLE, table, [short.fd]) == NACK
            assert await frontend.ack(Request.SET_MEM_TABLE, table, [read]) == NACK
            assert await frontend.ack(Request.SET_MEM_TABLE, table, [frontend.memory.fd]) == 0
            # The inflight area the back-end hands out is sealed like guest RAM; an
            # unsealed one handed back is refused.
            await frontend.send(Request.GET_INFLIGHT_FD, {
                "mmap_size": 0, "mmap_offset": 0, "num_queues": 1, "queue_size": 16})
            reply = await frontend.receive_with_fds()
            inflight_fd = reply.fds[0]
            try:
                assert fcntl.fcntl(inflight_fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
            finally:
                os.close(inflight_fd)
            area = {name: reply.payload[name]
                    for name in ("mmap_size", "mmap_offset", "num_queues", "queue_size")}
            assert await frontend.ack(Request.SET_INFLIGHT_FD, area, [unsealed.fd]) == NACK
            await frontend.start()
            await _serves_a_request(frontend)
    finally:
        unsealed.close()
        short.close()
        os.close(read)
        os.close(write)


async def test_unsealed_memory_is_accepted_when_allowed(tmp_path: Path) -> None:
    unsealed = MemfdMemory(seals=0)
    try:
        async with served(RngDevice(), tmp_path, allow_unsealed_memory=True) as path, \
                connected(path, unsealed) as frontend:
            await _rng_ready(frontend)
            await frontend.start()
            await _serves_a_request(frontend)
            # Still refused: a file shorter than the region.
            short = MemfdMemory(MEMORY_SIZE // 2, seals=0)
            try:
                table = {"nregions": 1, "regions": [frontend.memory.region()]}
                assert await frontend.ack(Request.SET_MEM_TABLE, table, [short.fd]) == NACK
            finally:
                short.close()
    finally:
        unsealed.close()


async def test_backend_cli_takes_allow_unsealed_memory(tmp_path: Path) -> None:
    for allow, expected in ((False, NACK), (True, 0)):
        sock = tmp_path / f"rng-{allow}.sock"
        argv = [sys.executable, "-m", "avmm.vhost.cli", "backend", "rng", "--socket",
                str(sock), *(["--allow-unsealed-memory"] if allow else [])]
        process = await trio.lowlevel.open_process(argv, cwd=REPO, stdin=subprocess.DEVNULL)
        unsealed = MemfdMemory(seals=0)
        try:
            with trio.fail_after(30):
                while not sock.exists():
                    assert process.poll() is None
                    await trio.sleep(0.02)
            async with connected(str(sock), unsealed) as frontend:
                await _rng_ready(frontend)
                table = {"nregions": 1, "regions": [unsealed.region()]}
                assert await frontend.ack(Request.SET_MEM_TABLE, table,
                                          [unsealed.fd]) == expected
        finally:
            unsealed.close()
            process.terminate()
            with trio.fail_after(10):
                await process.wait()


# -- B9: only eventfds for kick, call and err -----------------------------------------


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                                      Request.SET_VRING_ERR])
@pytest.mark.parametrize("kind", ["pipe", "file"])
async def test_vring_fds_that_are_not_eventfds_are_refused(
    tmp_path: Path, request_: Request, kind: str,
) -> None:
    if kind == "pipe":
        read, write = os.pipe()
        fds = [read, write]
        wrong = write
    else:
        wrong = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT, 0o600)
        fds = [wrong]
    try:
        async with served(RngDevice(), tmp_path) as path, connected(path) as frontend:
            await _rng_ready(frontend)
            assert await frontend.ack(request_, 0, [wrong]) == NACK
            await frontend.start()  # with the ring's eventfds: accepted, and it works
            await _serves_a_request(frontend)
    finally:
        for fd in fds:
            os.close(fd)


# -- B10: idle clients -----------------------------------------------------------------


def _dropped(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [entry for entry in logs if entry["event"] == "front-end dropped"]


async def test_an_idle_client_is_dropped_and_the_next_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backend_module, "HANDSHAKE_TIMEOUT_S", 0.5)
    with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with served(RngDevice(), tmp_path) as path:
            idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with idle:
                idle.connect(path)
                # A second client queues behind the idle one, and is served once the
                # idle one is dropped.
                async with connected(path) as frontend:
                    await _rng_ready(frontend)
                    await frontend.start()
                    await _serves_a_request(frontend)
    dropped = _dropped(logs)
    assert len(dropped) == 1, logs
    assert "handshake not done" in str(dropped[0]["reason"])
    assert dropped[0]["peer_pid"] == os.getpid() and dropped[0]["peer_uid"] == os.getuid()


async def test_a_message_that_never_completes_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even after the handshake, a message once begun must be complete in time."""
    monkeypatch.setattr(backend_module, "HANDSHAKE_TIMEOUT_S", 0.5)
    with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with served(RngDevice(), tmp_path) as path, connected(path) as slow:
            await slow.handshake()
            await slow.sock.send(b"\x01\x00\x00")  # 3 bytes of a 12-byte header
            async with connected(path) as frontend:
                await _rng_ready(frontend)
                await frontend.start()
                await _serves_a_request(frontend)
    dropped = _dropped(logs)
    assert len(dropped) == 1 and "no complete message" in str(dropped[0]["reason"]), logs


async def test_a_front_end_waiting_for_its_driver_is_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After SET_OWNER and GET_FEATURES a front-end may be silent (its guest has not set
    DRIVER_OK yet): the timeout does not apply."""
    monkeypatch.setattr(backend_module, "HANDSHAKE_TIMEOUT_S", 0.3)
    async with served(RngDevice(), tmp_path) as path, connected(path) as frontend:
        await _rng_ready(frontend)
        await trio.sleep(1.0)  # several timeouts long
        await frontend.start()
        await _serves_a_request(frontend)


# -- B11: NEED_REPLY only once REPLY_ACK is negotiated --------------------------------


async def test_need_reply_before_reply_ack_is_negotiated_gets_no_answer(
    tmp_path: Path,
) -> None:
    async with served(RngDevice(), tmp_path) as path, connected(path) as frontend:
        await frontend.send(Request.SET_OWNER, need_reply=True)
        assert await frontend.get(Request.GET_FEATURES) & VHOST_USER_F_PROTOCOL_FEATURES
        offered = await frontend.get(Request.GET_PROTOCOL_FEATURES)
        assert offered & REPLY_ACK
        # This very message does not ack REPLY_ACK: not negotiated, so no answer.
        await frontend.send(Request.SET_PROTOCOL_FEATURES, 0, need_reply=True)
        assert await frontend.get(Request.GET_QUEUE_NUM) == 1  # the next reply is this
        # Acking REPLY_ACK with NEED_REPLY: the front-end wants the answer, and gets it.
        assert await frontend.ack(Request.SET_PROTOCOL_FEATURES, REPLY_ACK) == 0
        assert await frontend.ack(Request.SET_OWNER) == 0


async def test_an_empty_get_config_reply_is_received_as_a_refusal() -> None:
    """The error answer of GET_CONFIG (vhost-user.rst: a zero-length payload) is sent as
    such and received as VhostRequestRefused, the connection still in step."""
    from avmm.vhost.protocol import Message, encode_message, receive_message, send_message

    assert encode_message(Message(Request.GET_CONFIG, None, reply=True)) == bytes(
        [24, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0])
    left, right = trio.socket.socketpair(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with left, right:
        await send_message(left, Message(Request.GET_CONFIG, None, reply=True))
        await send_message(left, Message(Request.GET_QUEUE_NUM, 1, reply=True))
        with pytest.raises(VhostRequestRefused):
            await receive_message(right)
        assert (await receive_message(right)).payload == 1


# -- the socket path ----------------------------------------------------------------------


async def test_a_second_backend_on_a_live_socket_is_refused(tmp_path: Path) -> None:
    """A back-end started on the socket of one that is serving fails with one line and
    leaves it alone: the first keeps its path and serves the next front-end (the path
    used to be unlinked and taken, the first left running unreachable)."""
    from avmm.vhost.backend import VhostBackendError

    async with served(RngDevice(), tmp_path) as path:
        identity = os.stat(path).st_ino
        with pytest.raises(VhostBackendError, match="another program is listening on"), \
                trio.fail_after(WAIT_S):  # (it would serve there until cancelled)
            await backend_module.serve_device(RngDevice(), path)
        assert os.stat(path).st_ino == identity
        async with connected(path) as frontend:
            await frontend.handshake()
            assert frontend.features & VIRTIO_F_VERSION_1


async def test_a_stale_socket_is_replaced_and_another_file_is_not(tmp_path: Path) -> None:
    """A socket file nobody listens on (a back-end that died) is replaced; a regular
    file at the path is refused and kept."""
    from avmm.vhost.backend import VhostBackendError

    device = RngDevice()
    stale = tmp_path / f"{device.name}.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(stale))
    left.close()  # the file stays, nobody listens
    async with served(device, tmp_path) as path, connected(path) as frontend:
        await frontend.handshake()
        assert frontend.features & VIRTIO_F_VERSION_1
    other = tmp_path / "file"
    other.write_bytes(b"keep")
    with pytest.raises(VhostBackendError, match="is not a socket"):
        await backend_module.serve_device(RngDevice(), str(other))
    assert other.read_bytes() == b"keep"
