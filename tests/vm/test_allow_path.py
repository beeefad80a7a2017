"""A VM built under ``--allow-path`` (a restricted PathPolicy) with every kind of path
inside the allowed directory: it boots and uses them all through the fds the policy
opened."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from avmm.config import ConsoleConfig, DiskConfig, SerialConfig
from avmm.paths import PathPolicy
from avmm.vm import VirtualMachine
from tests.vm.helpers import TEST_GUEST, guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


@pytest.fixture
def allowed() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="avmm-ap-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_a_vm_uses_every_kind_of_path_inside_the_allowed_directory(
        allowed: Path) -> None:
    from tests.vhost.test_frontend import avmm_backend, random_image

    kernel = allowed / "guest.elf"
    shutil.copy(TEST_GUEST, kernel)
    local = random_image(allowed / "local.img", 64 * 1024)
    remote = random_image(allowed / "remote.img", 64 * 1024)
    backend_socket = allowed / "blk.sock"
    policy = PathPolicy([allowed])
    config = dataclasses.replace(
        guest_config("avmm.test=blk-crc", memory_mib=64, kernel=kernel,
                     serial=SerialConfig(mode="file", path=allowed / "serial.log")),
        disks=(DiskConfig(path=local, readonly=True), DiskConfig(vhost_user=backend_socket)),
        console=ConsoleConfig(mode="socket", path=allowed / "console.sock"),
    )
    try:
        with avmm_backend("blk", backend_socket, "--image", str(remote)):
            with trio.fail_after(120):
                async with VirtualMachine(config, paths=policy) as vm:
                    assert (allowed / "console.sock").is_socket()
                    # A reconnection looks the name up in the directory resolved at start.
                    vhost = vm.virtio_slots[1].device
                    address = str(vhost.socket_path)  # type: ignore[attr-defined]
                    assert address.startswith("/proc/self/fd/") and address.endswith(
                        "/blk.sock")
                    probe = socket.socket(socket.AF_UNIX)
                    probe.connect(address)
                    probe.close()
                    await vm.wait()
        output = (allowed / "serial.log").read_text()
        assert f"blk0 sectors=128 crc32={zlib.crc32(local.read_bytes()):08x}" in output
        assert f"blk1 sectors=128 crc32={zlib.crc32(remote.read_bytes()):08x}" in output
        assert not (allowed / "console.sock").exists()
    finally:
        policy.close()
