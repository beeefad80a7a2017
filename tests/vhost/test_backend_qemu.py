"""avmm's vhost-user back-end against a real front-end: QEMU's vhost-user-blk and
vhost-user-rng on the microvm machine, driven by the test guest.

The back-end runs in a subprocess (``avmm backend ...`` via ``python -m avmm.cli``); guest RAM
is a shared memfd so that the back-end can map it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from virtio_guest_support import expected_pattern

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

REPO = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
TIMEOUT_S = 60
STATUS_POWER_OFF = 0


@contextmanager
def backend(kind: str, sock: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``avmm backend KIND --socket SOCK ARGS...`` in a subprocess, listening on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "avmm.cli", "--log-level", "info",
         "backend", kind, "--socket", str(sock), *args],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert process.poll() is None, process.communicate()[1].decode()
            assert time.monotonic() < deadline, "back-end never listened"
            time.sleep(0.02)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        process.stderr_text = stderr.decode(errors="replace")  # type: ignore[attr-defined]


def run_guest(elf: Path, cmdline: str, devices: Sequence[str]) -> tuple[int, list[str]]:
    argv = [
        QEMU,
        "-M", "microvm,accel=tcg,acpi=off,memory-backend=mem",
        "-m", "64",
        "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
        "-smp", "1", "-nographic", "-nodefaults", "-no-reboot",
        "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0x501,iosize=2",
        "-device", "i8042",
        "-global", "virtio-mmio.force-legacy=false",
        "-kernel", str(elf),
        "-append", cmdline,
        *devices,
    ]  # fmt: skip
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=TIMEOUT_S, check=False)
    stdout = result.stdout.decode(errors="replace")
    assert "avmm-testguest" in stdout, f"no guest output; stderr: {result.stderr!r}"
    return result.returncode, stdout.splitlines()


def vhost_device(name: str, sock: Path) -> list[str]:
    return ["-chardev", f"socket,id=vu,path={sock}", "-device", f"{name},chardev=vu"]


def test_blk_crc_over_vhost_user(test_guest: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(4 << 20))
    crc = zlib.crc32(image.read_bytes())
    sock = tmp_path / "blk.sock"
    with backend("blk", sock, "--image", str(image)) as process:
        assert os.stat(sock).st_mode & 0o777 == 0o600
        status, lines = run_guest(test_guest, "avmm.test=blk-crc",
                                  vhost_device("vhost-user-blk", sock))
    assert lines == [f"avmm-testguest: blk0 sectors=8192 crc32={crc:08x}"], lines
    assert status == STATUS_POWER_OFF
    assert process.returncode == 0, process.stderr_text  # type: ignore[attr-defined]
    assert not sock.exists()


def test_blk_write_over_vhost_user(test_guest: Path, tmp_path: Path) -> None:
    seed, sectors = 5, 128
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(sectors * 512))
    sock = tmp_path / "blk.sock"
    with backend("blk", sock, "--image", str(image)):
        status, lines = run_guest(test_guest, f"avmm.test=blk-write avmm.seed={seed}",
                                  vhost_device("vhost-user-blk", sock))
    assert status == STATUS_POWER_OFF, lines
    assert image.read_bytes() == expected_pattern(seed, sectors)


def test_rng_over_vhost_user(test_guest: Path, tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    with backend("rng", sock):
        status, lines = run_guest(test_guest, "avmm.test=rng",
                                  vhost_device("vhost-user-rng", sock))
    assert len(lines) == 1 and re.fullmatch(r"avmm-testguest: rng0 [0-9a-f]{64}", lines[0]), lines
    assert status == STATUS_POWER_OFF


def _hostile(sock_path: Path, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send ``data`` (with ``fds``) and wait until the back-end hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(sock_path))
        socket.send_fds(sock, [data], list(fds)) if fds else sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass  # it hung up with our bytes unread


def test_hostile_clients_are_dropped_then_qemu_is_served(test_guest: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    crc = zlib.crc32(image.read_bytes())
    sock = tmp_path / "blk.sock"
    header = lambda request, flags, size: (  # noqa: E731
        request.to_bytes(4, "little") + flags.to_bytes(4, "little") + size.to_bytes(4, "little")
    )
    many = [os.eventfd(0) for _ in range(12)]
    try:
        with backend("blk", sock, "--image", str(image)) as process:
            _hostile(sock, os.urandom(200))
            _hostile(sock, header(1, 1, 1 << 30))  # lying size
            _hostile(sock, header(999, 1, 0))  # unknown request
            _hostile(sock, header(8, 1, 8) + b"\x00\x00")  # truncated
            _hostile(sock, header(8, 1, 7) + bytes(7))  # wrong size for SET_VRING_NUM
            _hostile(sock, header(3, 1, 0), many[:9])  # too many fds
            _hostile(sock, header(3, 1, 0), many[:1])  # fd where none belongs
            # A ring that does not exist: refused, but not a reason to hang up.
            _hostile(sock, header(12, 1, 8) + (5).to_bytes(8, "little"), many[:1])
            status, lines = run_guest(test_guest, "avmm.test=blk-crc",
                                      vhost_device("vhost-user-blk", sock))
        assert lines == [f"avmm-testguest: blk0 sectors=2048 crc32={crc:08x}"], lines
        assert status == STATUS_POWER_OFF
        stderr = process.stderr_text  # type: ignore[attr-defined]
        assert process.returncode == 0, stderr
        assert stderr.count("front-end dropped") >= 7, stderr
        assert stderr.count("request refused") >= 1, stderr
    finally:
        for fd in many:
            os.close(fd)
