"""Snapshots that cannot be restored are refused with one line (``avmm up --restore``
exits 2 with it on stderr), never a traceback or a guest running on garbage; snapshots
that cannot be taken are refused before anything is written."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from avmm import VirtualMachine
from avmm.devices._state import DeviceStateError
from avmm.errors import PathNotAllowedError, StateError, VmStateError
from avmm.paths import PathPolicy
from avmm.state import MemoryImage, SnapshotError, StateCompatibilityError
from avmm.state.format import MAGIC, build_state, read_state_file
from avmm.state.snapshot import MEMORY_FILE_NAME, STATE_FILE_NAME
from avmm.state.vm_state import SNAPSHOT_SECTIONS
from tests.vm.helpers import TEST_GUEST

from .support import MEM_WALK, console_config, restore_in_new_process, snapshot_mid_walk

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

EXIT_USAGE = 2


@pytest.fixture(scope="module")
def good_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("snapshots") / "good"
    trio.run(snapshot_mid_walk, path)
    return path


def damaged_copy(good: Path, where: Path) -> Path:
    shutil.copytree(good, where)
    return where


def assert_one_line_refusal(result: object) -> str:
    returncode = result.returncode  # type: ignore[attr-defined]
    stderr = result.stderr.decode()  # type: ignore[attr-defined]
    stdout = result.stdout.decode()  # type: ignore[attr-defined]
    assert returncode == EXIT_USAGE, (returncode, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("avmm: ")]
    assert len(lines) == 1, stderr
    assert "mem-walk" not in stdout, "a guest ran from a damaged snapshot"
    return lines[0]


async def assert_refused_in_process(path: Path, **kwargs: object) -> str:
    with pytest.raises(StateError) as caught:
        async with VirtualMachine.restore(path, **kwargs):  # type: ignore[arg-type]
            raise AssertionError("a damaged snapshot was restored")
    message = str(caught.value)
    assert "\n" not in message and message
    return message


async def test_truncated_state_files_are_refused(good_snapshot: Path, tmp_path: Path) -> None:
    size = (good_snapshot / STATE_FILE_NAME).stat().st_size
    offsets = sorted({0, 1, len(MAGIC), 12, 20, size // 4, size // 2, size - 33, size - 32,
                      size - 1})
    assert len(offsets) == 10
    for offset in offsets:
        path = damaged_copy(good_snapshot, tmp_path / f"cut{offset}")
        with open(path / STATE_FILE_NAME, "r+b") as file:
            file.truncate(offset)
        line = assert_one_line_refusal(await restore_in_new_process(path))
        assert str(path) in line, line


async def test_bit_flips_are_refused(good_snapshot: Path, tmp_path: Path) -> None:
    data = (good_snapshot / STATE_FILE_NAME).read_bytes()
    path = damaged_copy(good_snapshot, tmp_path / "flipped")
    chooser = random.Random(12)
    for _ in range(100):
        bit = chooser.randrange(len(data) * 8)
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        (path / STATE_FILE_NAME).write_bytes(damaged)
        message = await assert_refused_in_process(path)
        assert str(path) in message, message
    # The same, through the command line, for a few of them.
    for bit in (0, len(data) * 4, len(data) * 8 - 1):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        (path / STATE_FILE_NAME).write_bytes(damaged)
        assert_one_line_refusal(await restore_in_new_process(path))


async def test_a_bit_flip_in_copied_memory_is_refused(good_snapshot: Path,
                                                      tmp_path: Path) -> None:
    """Copying reads the whole memory file, so its digest is checked; a mapped restore
    reads nothing up front (see README: Snapshots, limits)."""
    path = damaged_copy(good_snapshot, tmp_path / "memory")
    memory = path / MEMORY_FILE_NAME
    with open(memory, "r+b") as file:
        file.seek(0x100000 + 123)  # the test guest's kernel: data, not a hole
        byte = file.read(1)
        assert byte
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 0x10]))
    assert_one_line_refusal(await restore_in_new_process(path, "--copy-memory"))


async def test_another_format_version_is_refused(good_snapshot: Path, tmp_path: Path) -> None:
    path = damaged_copy(good_snapshot, tmp_path / "version")
    data = bytearray((path / STATE_FILE_NAME).read_bytes())
    struct.pack_into("<I", data, len(MAGIC), 99)
    (path / STATE_FILE_NAME).write_bytes(data)
    line = assert_one_line_refusal(await restore_in_new_process(path))
    assert "format 99" in line, line


async def test_a_missing_memory_file_is_refused(good_snapshot: Path, tmp_path: Path) -> None:
    path = damaged_copy(good_snapshot, tmp_path / "nomemory")
    (path / MEMORY_FILE_NAME).unlink()
    line = assert_one_line_refusal(await restore_in_new_process(path))
    assert "memory file is missing" in line, line


async def test_a_missing_snapshot_directory_is_refused(tmp_path: Path) -> None:
    line = assert_one_line_refusal(await restore_in_new_process(tmp_path / "nothing"))
    assert str(tmp_path / "nothing") in line
    await assert_refused_in_process(tmp_path / "nothing")


async def test_an_unknown_vhost_user_name_is_refused(good_snapshot: Path) -> None:
    message = await assert_refused_in_process(good_snapshot, vhost_user={"blk0": "/x.sock"})
    assert "'blk0'" in message


async def test_restore_goes_through_the_path_policy(good_snapshot: Path,
                                                    tmp_path: Path) -> None:
    policy = PathPolicy([tmp_path])
    try:
        with pytest.raises(PathNotAllowedError):
            async with VirtualMachine.restore(good_snapshot, paths=policy):
                raise AssertionError("restored from outside the allowed directories")
    finally:
        policy.close()


async def test_only_a_paused_vm_is_snapshotted_and_never_over_anything(
        tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    existing = allowed / "existing"
    existing.mkdir(parents=True)
    (existing / "keep").write_text("mine")
    # The daemon's policy: the guest's kernel may be read, snapshots go to "allowed".
    policy = PathPolicy([TEST_GUEST.parent, allowed])
    try:
        async with VirtualMachine(console_config(MEM_WALK), paths=policy) as vm:
            with pytest.raises(VmStateError):
                await vm.snapshot(allowed / "running")
            await vm.pause()
            with pytest.raises(SnapshotError, match="already exists"):
                await vm.snapshot(existing)
            with pytest.raises(PathNotAllowedError):
                await vm.snapshot(tmp_path / "outside")
            vm.stop()
    finally:
        policy.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["allowed"]
    assert sorted(p.name for p in allowed.iterdir()) == ["existing"]
    assert (existing / "keep").read_text() == "mine"
    assert sorted(p.name for p in existing.iterdir()) == ["keep"]


def rewritten(good: Path, where: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of ``good`` whose state file holds sections ``change`` altered, written
    whole (a valid SHA-256): a state avmm could have read but cannot restore."""
    path = damaged_copy(good, where)
    state_file = path / STATE_FILE_NAME
    sections = read_state_file(state_file, {**SNAPSHOT_SECTIONS, "memory": MemoryImage | None})
    change(sections)
    state_file.write_bytes(build_state(sections))
    return path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _bad_uart(sections: dict[str, Any]) -> None:
    devices = sections["devices"]
    sections["devices"] = dataclasses.replace(
        devices, serial=dataclasses.replace(devices.serial, ier=0xFF))


def _every_cpu_feature(sections: dict[str, Any]) -> None:
    """The guest saw every feature bit of CPUID leaf 7: no host offers them all."""
    machine = sections["machine"]
    vcpu = machine.vcpus[0]
    cpuid = [dataclasses.replace(leaf, ebx=0xFFFF_FFFF, ecx=0xFFFF_FFFF, edx=0xFFFF_FFFF)
             if (leaf.function, leaf.index) == (7, 0) else leaf for leaf in vcpu.cpuid]
    assert cpuid != vcpu.cpuid
    sections["machine"] = dataclasses.replace(
        machine, vcpus=[dataclasses.replace(vcpu, cpuid=cpuid)])


def _more_vcpus_in_config(sections: dict[str, Any]) -> None:
    config = sections["config"]
    sections["config"] = dataclasses.replace(
        config, machine=dataclasses.replace(config.machine, vcpus=2))


@pytest.mark.parametrize("change,error", [
    (_bad_uart, DeviceStateError),
    (_every_cpu_feature, StateCompatibilityError),
    (_more_vcpus_in_config, SnapshotError),
])
async def test_a_state_that_does_not_fit_is_refused_and_releases_everything(
        good_snapshot: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None],
        error: type[Exception]) -> None:
    """Refused after the machine was half built (KVM VM, memory mapped, vCPUs, UART):
    one line, the right class, nothing left open, no vCPU thread started."""
    path = rewritten(good_snapshot, tmp_path / "changed", change)
    fds = open_fds()
    with pytest.raises(error) as caught:
        async with VirtualMachine.restore(path):
            raise AssertionError("restored a state that does not fit")
    assert "\n" not in str(caught.value) and str(path) in str(caught.value), caught.value
    assert open_fds() == fds
    assert not [t.name for t in threading.enumerate() if "vcpu" in t.name]
    assert_one_line_refusal(await restore_in_new_process(path))
