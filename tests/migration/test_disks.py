"""Migration of a VM writing its disk (the test guest's ``blk-write``): the disk is a
file both sides open (shared storage), or a vhost-user back-end per side on the same
image (``avmm backend blk``; qemu-storage-daemon with ``locking=off``). Migrated in
the middle of the write half, the guest finishes on the destination and the pattern on
the disk is complete and correct: no write lost, none repeated wrongly. A back-end that
cannot log its writes makes the migration refuse up front, and the VM runs on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmState
from avmm.config import DiskConfig, VmConfig
from avmm.migration import MigrationError
from avmm.vhost.protocol import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature
from avmm.virtio.device import VIRTIO_F_VERSION_1
from tests.traffic_support import (
    BLK_SECTORS,
    blank_image,
    blk_disk,
    blk_served,
    wait_for_sectors,
)
from tests.vhost.scripted_backend import ScriptedBackend
from tests.virtio_guest_support import expected_pattern

from .support import MEM_WALK, TIMEOUT_S, collect, guest_config, read_until

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

# 32 MiB: the guest writes it, then reads it all back. With small requests, enough
# work that the guest is still busy when a migration of its 64 MiB of RAM ends, on a
# loaded machine too.
SECTORS = 4 * BLK_SECTORS
SEED = 7
#: Small requests (the guest's default is 128 sectors): the write half lasts long
#: enough that the migration lands in its middle however fast either of them is, and
#: its first half (where the test starts the migration, polling every 2 ms) lasts
#: hundreds of milliseconds rather than the 40 to 150 ms of 8-sector requests on 16 MiB.
REQUEST_SECTORS = 4


def disk_config(kind: str, image: Path, sock: Path) -> VmConfig:
    return dataclasses.replace(
        guest_config(f"avmm.test=blk-write avmm.seed={SEED} avmm.req={REQUEST_SECTORS}",
                     memory_mib=64),
        disks=(blk_disk(kind, image, sock),))


@pytest.mark.parametrize("kind", ["file", "avmm",
                                  pytest.param("qsd", marks=pytest.mark.qemu)])
async def test_blk_write_completes_on_the_destination(tmp_path: Path, kind: str) -> None:
    image = blank_image(tmp_path / "disk.img", SECTORS)
    source_sock, destination_sock = tmp_path / "src.sock", tmp_path / "dst.sock"
    before, after = bytearray(), bytearray()
    # Two back-ends on one image (shared storage): qemu-storage-daemon without its lock.
    with blk_served(kind, image, source_sock, shared=True), \
            blk_served(kind, image, destination_sock, shared=True), \
            trio.fail_after(TIMEOUT_S * 2):
        # The destination's own back-end (a new socket); a file disk keeps its path.
        given = disk_config(kind, image, destination_sock) if kind != "file" else None
        async with trio.open_nursery() as nursery, \
                VirtualMachine.receive(f"unix:{tmp_path / 'in.sock'}",
                                       config=given) as destination:
            async with VirtualMachine(disk_config(kind, image, source_sock)) as source:
                nursery.start_soon(collect, source, before)
                await wait_for_sectors(source, 1, SECTORS // 2)
                await source.migrate(f"unix:{tmp_path / 'in.sock'}")
                assert (await source.wait()).reason is StopReason.MIGRATED
            nursery.start_soon(collect, destination, after)
            end = await destination.wait()
    assert not end.failed, end
    # The write half may end during pre-copy (its line then starts on the source and
    # ends on the destination): the read-back check always runs on the destination.
    assert "verify=" not in before.decode(), "the guest verified before the migration"
    whole = (before + after).decode()
    assert f"blk0 written={SECTORS} verify=ok" in whole, whole
    assert "verify=ok" in after.decode(), after.decode()
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
