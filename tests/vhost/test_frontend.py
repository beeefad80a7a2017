"""avmm as a vhost-user front-end: the test guest drives devices whose queues are served
by another process (qemu-storage-daemon, ``avmm backend ...``), and hostile back-ends
cannot crash or hang the VMM."""

from __future__ import annotations

import array
import dataclasses
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmExit
from avmm.config import DiskConfig, NetConfig, VhostUserConfig, VmConfig
from avmm.errors import VmStartError
from avmm.vhost.protocol import Request
from avmm.virtio.mmio import DeviceStatus
from tests.prerequisites import require
from tests.virtio_guest_support import echoing_tap, expected_pattern
from tests.vm.helpers import guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

REPO = Path(__file__).resolve().parents[2]
VM_TIMEOUT_S = 30


async def run(config: VmConfig) -> tuple[VmExit, str, VirtualMachine]:
    output = bytearray()
    with trio.fail_after(VM_TIMEOUT_S):
        async with VirtualMachine(config) as vm:
            async for chunk in vm.serial:
                output += chunk
            result = await vm.wait()
    return result, output.decode(errors="replace"), vm


def _wait_for_socket(sock: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not sock.exists():
        if process.poll() is not None:
            raise AssertionError(process.communicate()[1].decode(errors="replace"))
        assert time.monotonic() < deadline, "back-end never listened"
        time.sleep(0.02)


@contextmanager
def subprocess_backend(argv: Sequence[str], sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(list(argv), cwd=REPO, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_socket(sock, process)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            captured = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            captured = process.communicate()
        # What it printed, for a test that reads it once the back-end has ended.
        process.captured = captured  # type: ignore[attr-defined]


def avmm_backend(kind: str, sock: Path, *args: str, prefix: Sequence[str] = ()
                 ) -> Iterator[subprocess.Popen[bytes]]:
    return subprocess_backend(
        [*prefix, sys.executable, "-m", "avmm.cli", "--log-level", "info", "backend", kind,
         "--socket", str(sock), *args], sock)


def storage_daemon(image: Path, sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    return subprocess_backend(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=file,filename={image}",
         "--export", "type=vhost-user-blk,id=exp,node-name=file,addr.type=unix,"
         f"addr.path={sock},writable=on"], sock)


def random_image(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def blk_config(cmdline: str, sock: Path) -> VmConfig:
    return dataclasses.replace(guest_config(cmdline, memory_mib=64),
                               disks=(DiskConfig(vhost_user=sock),))


# -- real back-ends --------------------------------------------------------------------


@contextmanager
def blk_backend(kind: str, image: Path, sock: Path) -> Iterator[object]:
    if kind == "qsd":
        if shutil.which("qemu-storage-daemon") is None:
            require("qemu-storage-daemon is not installed (make deps installs qemu-system-x86)")
        with storage_daemon(image, sock) as process:
            yield process
    else:
        with avmm_backend("blk", sock, "--image", str(image)) as process:
            yield process


@pytest.mark.parametrize("kind", ["qsd", "avmm"])
async def test_blk_crc_through_a_vhost_user_backend(
    tmp_path: Path, kind: str, figure: Callable[[str, str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from avmm.vm_virtio import VirtioMmioSlot

    # Count the queue notifications that reach avmm's process (a QueueNotify write the
    # ioeventfd did not catch); with vhost-user the kicks go from KVM to the back-end.
    notified: list[int] = []
    original = VirtioMmioSlot._queue_notify

    def counting(slot: VirtioMmioSlot, index: int) -> None:
        notified.append(index)
        original(slot, index)

    monkeypatch.setattr(VirtioMmioSlot, "_queue_notify", counting)
    size = 2 << 20
    image = random_image(tmp_path / "disk.img", size)
    sock = tmp_path / "blk.sock"
    with blk_backend(kind, image, sock):
        started = time.monotonic()
        result, output, _ = await run(blk_config("avmm.test=blk-crc", sock))
        elapsed = time.monotonic() - started
    crc = zlib.crc32(image.read_bytes())
    assert f"blk0 sectors={size // 512} crc32={crc:08x}" in output, output
    assert result.reason is StopReason.RESET
    assert notified == []
    figure(f"vhost-user blk-crc 2 MiB via {kind}: whole VM run (s)", f"{elapsed:.2f}")


@pytest.mark.parametrize("kind", ["qsd", "avmm"])
async def test_blk_write_through_a_vhost_user_backend(tmp_path: Path, kind: str) -> None:
    sectors = 2048
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(sectors * 512))
    sock = tmp_path / "blk.sock"
    seed = int.from_bytes(os.urandom(4), "little")
    with blk_backend(kind, image, sock):
        result, output, _ = await run(blk_config(f"avmm.test=blk-write avmm.seed={seed}", sock))
    assert f"blk0 written={sectors} verify=ok" in output, output
    assert image.read_bytes() == expected_pattern(seed, sectors)
    assert result.reason is StopReason.RESET


def rng_config(sock: Path) -> VmConfig:
    """The test guest reading an entropy device served at ``sock`` (the generic
    ``[[vhost_user]]`` section)."""
    return dataclasses.replace(
        guest_config("avmm.test=rng"),
        vhost_users=(VhostUserConfig(socket=sock, device_id=4, num_queues=1),))


def check_rng_output(result: VmExit, output: str) -> None:
    assert re.search(r"rng0 [0-9a-f]{64}\n", output), output
    assert result.reason is StopReason.RESET


async def test_rng_through_the_generic_vhost_user_section(tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    with avmm_backend("rng", sock):
        result, output, _ = await run(rng_config(sock))
    check_rng_output(result, output)


@pytest.mark.net
async def test_net_echo_through_avmm_backend_net(tmp_path: Path) -> None:
    sock = tmp_path / "net.sock"
    with echoing_tap() as (namespace, _echoer), \
            avmm_backend("net", sock, "--tap", namespace.tap,
                         prefix=namespace.command_prefix()):
        config = dataclasses.replace(
            guest_config("avmm.test=net-echo avmm.n=20 avmm.size=256", memory_mib=64),
            nets=(NetConfig(vhost_user=sock, mac=bytes.fromhex("525400abcdef")),))
        result, output, _ = await run(config)
    assert "net0 mac=52:54:00:ab:cd:ef" in output, output
    assert "net0 echoed=20" in output, output
    assert result.reason is StopReason.RESET


# -- hostile back-ends -----------------------------------------------------------------

_HEADER = struct.Struct("<III")
_REPLY = 0x1 | 0x4


def _read_message(conn: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 12:
        chunk = conn.recv(12 - len(header))
        if not chunk:
            raise EOFError
        header += chunk
    request, _flags, size = _HEADER.unpack(header)
    payload = b""
    while len(payload) < size:
        chunk = conn.recv(size - len(payload))
        if not chunk:
            raise EOFError
        payload += chunk
    return request, payload


def _reply(conn: socket.socket, request: int, payload: bytes, fds: Sequence[int] = ()) -> None:
    ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                 if fds else [])
    conn.sendmsg([_HEADER.pack(request, _REPLY, len(payload)) + payload], ancillary)


def _hostile(conn: socket.socket, behaviour: str) -> None:
    """Answer like a back-end until ``behaviour`` says otherwise."""
    features = (1 << 32)  # VERSION_1 only: no protocol features
    while True:
        request, _payload = _read_message(conn)
        if request == Request.GET_FEATURES:
            if behaviour == "wrong-size":
                _reply(conn, request, struct.pack("<I", 1))
            elif behaviour == "unknown-request":
                _reply(conn, 999, struct.pack("<Q", features))
            elif behaviour == "wrong-reply":
                _reply(conn, Request.GET_QUEUE_NUM, struct.pack("<Q", features))
            elif behaviour == "too-many-fds":
                fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(12)]
                try:
                    _reply(conn, request, struct.pack("<Q", features), fds)
                finally:
                    for fd in fds:
                        os.close(fd)
            elif behaviour == "truncated":
                conn.sendall(_HEADER.pack(request, _REPLY, 8) + b"\1\2\3")
                conn.close()
                return
            elif behaviour == "silent":
                time.sleep(2)
                return
            else:
                _reply(conn, request, struct.pack("<Q", features))
        elif request == Request.SET_FEATURES and behaviour == "dies-at-start":
            conn.close()
            return


@contextmanager
def hostile_backend(path: Path, behaviour: str) -> Iterator[None]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                _hostile(conn, behaviour)
            except (EOFError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.close()
        thread.join(5)


@pytest.mark.parametrize(
    ("behaviour", "fragment"),
    [
        ("wrong-size", "malformed payload"),
        ("unknown-request", "unknown request code 999"),
        ("wrong-reply", "expected the reply to GET_FEATURES"),
        ("too-many-fds", "fds"),
        ("truncated", "in the middle of a message"),
        ("silent", "did not answer within"),
    ],
)
async def test_a_hostile_backend_at_handshake_stops_the_vm_start_cleanly(
    tmp_path: Path, behaviour: str, fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("avmm.vhost.frontend.HANDSHAKE_TIMEOUT_S", 0.5)
    sock = tmp_path / "evil.sock"
    config = dataclasses.replace(
        guest_config("avmm.test=rng"),
        vhost_users=(VhostUserConfig(socket=sock, device_id=4),))
    with hostile_backend(sock, behaviour), trio.fail_after(10), \
            pytest.raises(VmStartError) as caught:
        async with VirtualMachine(config):
            pass
    message = str(caught.value)
    assert "vhost-user back-end" in message and fragment in message, message


async def test_a_backend_that_dies_at_driver_ok_puts_the_device_in_needs_reset(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "dying.sock"
    config = dataclasses.replace(
        guest_config("avmm.test=rng"),
        vhost_users=(VhostUserConfig(socket=sock, device_id=4),))
    with hostile_backend(sock, "dies-at-start"):
        result, output, vm = await run(config)
    # The device stopped with DEVICE_NEEDS_RESET; the guest saw it and gave up on its
    # own (debug exit), the VMM did not fail.
    assert vm.virtio_slots[0].transport.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert result.reason is StopReason.DEBUG_EXIT, (result, output)
    assert "rng0" in output, output
