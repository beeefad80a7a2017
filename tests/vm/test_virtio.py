"""The test guest's virtio drivers against avmm's in-process virtio-mmio devices."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from avmm import StopReason, VirtualMachine, VmExit
from avmm.config import DiskConfig, NetConfig, RngConfig, VmConfig
from tests.prerequisites import net_problem, require
from tests.virtio_guest_support import TapNamespace

from .helpers import guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


def with_devices(config: VmConfig, **devices: object) -> VmConfig:
    import dataclasses

    return dataclasses.replace(config, **devices)  # type: ignore[arg-type]


async def run(config: VmConfig) -> tuple[VmExit, str]:
    output = bytearray()
    async with VirtualMachine(config) as vm:
        async for chunk in vm.serial:
            output += chunk
        result = await vm.wait()
    return result, output.decode(errors="replace")


def random_image(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


async def test_blk_crc_matches_the_host_crc32_of_the_image(
    tmp_path: Path, figure: Callable[[str, str], None]
) -> None:
    size = 8 << 20
    image = random_image(tmp_path / "disk.img", size)
    config = with_devices(guest_config("avmm.test=blk-crc", memory_mib=64),
                          disks=(DiskConfig(image),))
    output_bytes = bytearray()
    async with VirtualMachine(config) as vm:
        started = time.monotonic()
        async for chunk in vm.serial:
            output_bytes += chunk
        result = await vm.wait()
        elapsed = time.monotonic() - started
        stats = vm.virtio_slots[0].device.stats  # type: ignore[attr-defined]
    output = output_bytes.decode()
    crc = zlib.crc32(image.read_bytes())
    assert f"blk0 sectors={size // 512} crc32={crc:08x}" in output, output
    assert result.reason is StopReason.RESET
    assert stats.bytes_read >= size
    figure("blk-crc 8 MiB: read requests per second (whole VM run)",
           f"{stats.reads / elapsed:.0f} ({stats.reads} requests, "
           f"{size / elapsed / (1 << 20):.1f} MiB/s)")


async def test_blk_crc_with_two_disks_and_indirect_descriptors(tmp_path: Path) -> None:
    images = [random_image(tmp_path / f"d{i}.img", (i + 1) << 20) for i in range(2)]
    config = with_devices(guest_config("avmm.test=blk-crc avmm.indirect=1", memory_mib=64),
                          disks=tuple(DiskConfig(path) for path in images))
    result, output = await run(config)
    for i, image in enumerate(images):
        crc = zlib.crc32(image.read_bytes())
        assert f"blk{i} sectors={image.stat().st_size // 512} crc32={crc:08x}" in output
    assert result.reason is StopReason.RESET


async def test_blk_write_pattern_is_on_the_host_image_after_flush(tmp_path: Path) -> None:
    from tests.virtio_guest_support import expected_pattern

    sectors = 4096
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(sectors * 512))
    seed = int.from_bytes(os.urandom(4), "little")
    config = with_devices(guest_config(f"avmm.test=blk-write avmm.seed={seed}", memory_mib=64),
                          disks=(DiskConfig(image),))
    result, output = await run(config)
    assert f"blk0 written={sectors} verify=ok" in output, output
    assert image.read_bytes() == expected_pattern(seed, sectors)
    assert result.reason is StopReason.RESET


async def test_readonly_disk_refuses_writes_and_stays_unchanged(tmp_path: Path) -> None:
    image = random_image(tmp_path / "ro.img", 1 << 20)
    before = image.read_bytes()
    config = with_devices(guest_config("avmm.test=blk-write avmm.seed=3", memory_mib=64),
                          disks=(DiskConfig(image, readonly=True),))
    result, output = await run(config)
    assert "blk0 readonly write=ioerr" in output, output
    assert image.read_bytes() == before
    assert result.reason is StopReason.RESET


@pytest.fixture
def full_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: an image file on it can hold far less than its size."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)],
                   check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


async def test_writes_to_a_full_filesystem_fail_with_ioerr_and_the_vmm_stays_up(
    full_filesystem: Path,
) -> None:
    image = full_filesystem / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)  # 4 MiB sparse on a 256 KiB filesystem
    config = with_devices(guest_config("avmm.test=blk-io avmm.n=8192", memory_mib=64),
                          disks=(DiskConfig(image),))
    result, output = await run(config)
    match = re.search(r"blk0 status=(\w+) sector=(\d+)", output)
    assert match, output
    assert match.group(1) == "ioerr"
    assert 0 < int(match.group(2)) < 8192
    assert result.reason is StopReason.RESET  # the guest went on and shut down cleanly


@pytest.mark.parametrize("hostility", ["loop", "oob", "len"])
async def test_a_hostile_chain_puts_the_device_in_needs_reset_and_the_vm_keeps_running(
    tmp_path: Path, hostility: str
) -> None:
    image = random_image(tmp_path / "disk.img", 1 << 20)
    config = with_devices(guest_config(f"avmm.test=blk-hostile avmm.hostile={hostility}"),
                          disks=(DiskConfig(image),))
    result, output = await run(config)
    assert "blk0 needs_reset=1" in output, output
    assert "blk0 recovered=ok" in output, output
    assert result.reason is StopReason.RESET


async def test_rng_gives_random_bytes() -> None:
    config = with_devices(guest_config("avmm.test=rng"), rng=RngConfig())
    outputs = []
    for _ in range(2):
        result, output = await run(config)
        match = re.search(r"rng0 ([0-9a-f]{64})\n", output)
        assert match, output
        outputs.append(match.group(1))
        assert result.reason is StopReason.RESET
    assert outputs[0] != outputs[1]


@pytest.mark.parametrize("frame_size", [64, 1514])
async def test_net_echo_through_a_tap_in_a_network_namespace(
    echoing_tap: tuple[str, str], frame_size: int, figure: Callable[[str, str], None],
) -> None:
    tap, netns = echoing_tap
    config = with_devices(
        guest_config(f"avmm.test=net-echo avmm.n=50 avmm.size={frame_size}", memory_mib=64),
        nets=(NetConfig(tap=tap, mac=bytes.fromhex("525400abcdef"), netns=netns),))
    started = time.monotonic()
    result, text = await run(config)
    figure(f"net-echo 50 x {frame_size} B round trips: whole VM run (s)",
           f"{time.monotonic() - started:.2f}")
    assert "net0 mac=52:54:00:ab:cd:ef" in text, text
    assert "net0 echoed=50" in text, text
    assert result.reason is StopReason.RESET


def tap_rx(netns: str, tap: str) -> tuple[int, int]:
    """(frames, bytes) the host got from the VMM's side of ``tap`` so far."""
    out = subprocess.run(["ip", "-n", netns, "-j", "-s", "link", "show", "dev", tap],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    rx = json.loads(out)[0]["stats64"]["rx"]
    return rx["packets"], rx["bytes"]


async def test_tso_frames_leave_the_guest_whole() -> None:
    """The test guest negotiates VIRTIO_NET_F_CSUM and HOST_TSO4 (net-bench avmm.tso=1)
    and sends 64 KiB TCP segments that ask the host to checksum and segment them: each
    reaches the host's side of the tap as one frame of that size (the host kernel took
    the offload header avmm passed on)."""
    require(net_problem())
    n, size = 200, 65549
    with TapNamespace() as namespace:
        config = with_devices(
            guest_config(f"avmm.test=net-bench avmm.dir=tx avmm.tso=1 avmm.n={n} "
                         f"avmm.size={size}", memory_mib=64),
            nets=(NetConfig(tap=namespace.tap, mac=bytes.fromhex("525400abcdef"),
                            netns=namespace.netns),))
        frames, octets = tap_rx(namespace.netns, namespace.tap)
        result, text = await run(config)
        assert f"net-bench dir=tx size={size} n={n} tso=1 done" in text, text
        assert result.reason is StopReason.RESET
        frames_after, octets_after = tap_rx(namespace.netns, namespace.tap)
    assert frames_after - frames == n
    assert octets_after - octets == n * size


async def test_console_socket_is_private_accepts_a_client_and_goes_away(tmp_path: Path) -> None:
    import stat

    import trio

    from avmm.config import ConsoleConfig

    path = tmp_path / "console.sock"
    config = with_devices(guest_config("avmm.test=count avmm.n=100000000000000"),
                          console=ConsoleConfig(mode="socket", path=path))
    async with VirtualMachine(config) as vm:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(path.stat().st_mode)
        client = await trio.open_unix_socket(str(path))
        await client.send_all(b"typed before the guest has a driver")
        await client.aclose()
        assert vm.console is not None
        vm.stop()
        result = await vm.wait()
    assert result.reason is StopReason.STOPPED
    assert not path.exists()


@pytest.mark.parametrize("qd", [1, 32])
async def test_many_small_requests_all_complete_with_status_ok(tmp_path: Path, qd: int) -> None:
    # Regression: the used idx was published with a byte-by-byte store, and a driver
    # polling it could read a torn value (0x00ff -> 0x0000 -> 0x0100) and take an old
    # used element for a new completion, whose status byte was still unwritten.
    image = random_image(tmp_path / "disk.img", 16 << 20)
    config = with_devices(
        guest_config(f"avmm.test=blk-bench avmm.rw=read avmm.qd={qd} avmm.n=4000 "
                     "avmm.qsize=128", memory_mib=64),
        disks=(DiskConfig(image),))
    result, output = await run(config)
    assert f"blk-bench rw=read qd={qd} n=4000 done" in output, output
    assert result.reason is StopReason.RESET


async def test_blk_bench_reports_each_requests_latency(tmp_path: Path) -> None:
    # benchmarks/noisy.py reads this line for the quiet VM's median and 99th percentile.
    image = random_image(tmp_path / "disk.img", 16 << 20)
    config = with_devices(
        guest_config("avmm.test=blk-bench avmm.rw=read avmm.qd=4 avmm.n=300 avmm.lat=1",
                     memory_mib=64),
        disks=(DiskConfig(image),))
    _, output = await run(config)
    assert "blk-bench rw=read qd=4 n=300 done" in output, output
    found = re.search(r"blk-bench latency n=(\d+) p50=(\d+) p99=(\d+) max=(\d+)", output)
    assert found is not None, output
    n, p50, p99, worst = map(int, found.groups())
    assert n == 300
    assert 0 < p50 <= p99 <= worst, found.group(0)
    # Without avmm.lat the line is not printed (the benchmarks' other runs stay as they were).
    config = with_devices(guest_config("avmm.test=blk-bench avmm.n=10", memory_mib=64),
                          disks=(DiskConfig(image),))
    _, output = await run(config)
    assert "blk-bench rw=read qd=1 n=10 done" in output and "latency" not in output, output
