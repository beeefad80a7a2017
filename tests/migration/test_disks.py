"""Migration of a VM writing its disk (the test guest's ``blk-write``): the disk is a
file both sides open (shared storage), or a vhost-user back-end per side on the same
image (``avmm backend blk``; qemu-storage-daemon with ``locking=off``). Migrated in
the middle of the write half, the guest finishes on the destination and the pattern on
the disk is complete and correct: no write lost, none repeated wrongly. A back-end that
cannot log its writes makes the migration refuse up front, and the VM runs on."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmState
from avmm.config import DiskConfig, VmConfig
from avmm.migration import MigrationError
from avmm.vhost.protocol import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature
from avmm.virtio.device import VIRTIO_F_VERSION_1
from tests.prerequisites import require
from tests.vhost.scripted_backend import ScriptedBackend
from tests.vhost.test_frontend import avmm_backend, subprocess_backend
from tests.virtio_guest_support import expected_pattern
from tests.vm.helpers import MAILBOX_ADDRESS

from .support import MEM_WALK, TIMEOUT_S, collect, guest_config, read_until

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

COUNTER = MAILBOX_ADDRESS + 8
SECTORS = 8 * 2048  # 8 MiB: the guest writes it, then reads it all back
SEED = 7
#: Small requests (the guest's default is 128 sectors): the write half lasts long
#: enough that the migration lands in its middle however fast either of them is.
REQUEST_SECTORS = 8


@contextlib.contextmanager
def backend(kind: str, image: Path, sock: Path) -> Iterator[None]:
    if kind == "file":
        yield
    elif kind == "avmm":
        with avmm_backend("blk", sock, "--image", str(image)):
            yield
    else:
        if shutil.which("qemu-storage-daemon") is None:
            require("qemu-storage-daemon is not installed (make deps installs "
                    "qemu-system-x86)")
        # locking=off: the source's and the destination's daemons share the image.
        with subprocess_backend(
                ["qemu-storage-daemon", "--blockdev",
                 f"driver=file,node-name=file,filename={image},locking=off",
                 "--export", "type=vhost-user-blk,id=exp,node-name=file,addr.type=unix,"
                 f"addr.path={sock},writable=on"], sock):
            yield


def disk_config(kind: str, image: Path, sock: Path) -> VmConfig:
    disk = DiskConfig(path=image) if kind == "file" else DiskConfig(vhost_user=sock)
    return dataclasses.replace(
        guest_config(f"avmm.test=blk-write avmm.seed={SEED} avmm.req={REQUEST_SECTORS}",
                     memory_mib=64),
        disks=(disk,))


@pytest.mark.parametrize("kind", ["file", "avmm",
                                  pytest.param("qsd", marks=pytest.mark.qemu)])
async def test_blk_write_completes_on_the_destination(tmp_path: Path, kind: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SECTORS * 512))
    source_sock, destination_sock = tmp_path / "src.sock", tmp_path / "dst.sock"
    before, after = bytearray(), bytearray()
    with backend(kind, image, source_sock), backend(kind, image, destination_sock), \
            trio.fail_after(TIMEOUT_S * 2):
        # The destination's own back-end (a new socket); a file disk keeps its path.
        given = disk_config(kind, image, destination_sock) if kind != "file" else None
        async with trio.open_nursery() as nursery, \
                VirtualMachine.receive(f"unix:{tmp_path / 'in.sock'}",
                                       config=given) as destination:
            async with VirtualMachine(disk_config(kind, image, source_sock)) as source:
                assert source.memory is not None
                nursery.start_soon(collect, source, before)
                while not 0 < source.memory.read_u64(COUNTER) < SECTORS // 2:
                    await trio.sleep(0.002)
                await source.migrate(f"unix:{tmp_path / 'in.sock'}")
                assert (await source.wait()).reason is StopReason.MIGRATED
            nursery.start_soon(collect, destination, after)
            end = await destination.wait()
    assert not end.failed, end
    assert "verify=" not in before.decode(), "the write half ended before the migration"
    assert f"blk0 written={SECTORS} verify=ok" in after.decode(), after.decode()
    assert image.read_bytes() == expected_pattern(SEED, SECTORS)


async def test_a_backend_without_dirty_logging_is_refused_up_front(tmp_path: Path) -> None:
    sock = tmp_path / "scripted.sock"
    output = bytearray()
    with ScriptedBackend(sock, features=VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES
                         | VHOST_F_LOG_ALL,
                         protocol_features=1 << ProtocolFeature.REPLY_ACK):
        config = dataclasses.replace(guest_config(MEM_WALK),
                                     disks=(DiskConfig(vhost_user=sock),))
        async with trio.open_nursery() as nursery, VirtualMachine(config) as vm:
            nursery.start_soon(collect, vm, output)
            await read_until(output, "mem-walk round=1 crc=")
            with pytest.raises(MigrationError) as caught:
                await vm.migrate(f"unix:{tmp_path / 'nobody.sock'}")
            assert "LOG_SHMFD" in str(caught.value) and "blk0" in str(caught.value)
            assert "\n" not in str(caught.value)
            assert vm.state is VmState.RUNNING and vm.migration is None
            await read_until(output, "mem-walk round=3 crc=")
            vm.stop()
