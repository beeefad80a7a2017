"""Taking a snapshot of a VM in ``avmm serve --isolation process``: the daemon makes the
directory and the two files, the worker is handed the two open files only (never a
directory: openat with ".." would walk out of its jail), its VM writes into them, and the
daemon renames the directory into place, or removes it on any failure."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from avmm.api import ApiClient
from avmm.api.client import ApiError
from avmm.isolation import worker_vm
from avmm.isolation.channel import Channel, socketpair
from avmm.isolation.jail import UidAllocator
from avmm.isolation.worker_vm import ProcessIsolation, WorkerVm, sanitize_status
from avmm.state import SnapshotError
from avmm.state.format import write_state_fd
from avmm.state.memory_file import MemoryImage, MemoryRegionImage
from avmm.state.snapshot import MEMORY_FILE_NAME, MEMORY_SECTION, STATE_FILE_NAME
from tests.api.test_daemon import avmm
from tests.state.mem_walk import expected_lines, mem_walk_lines
from tests.vm.helpers import TEST_GUEST, guest_config

from .test_process_mode import UIDS, _check_worker_fds, _echo_here, _need_root, process_daemon

MIB = 1 << 20
#: A walk slow enough (about a second a round) to be paused between two rounds.
WALK_MIB, WALK_ROUNDS = 4, 4
WALK = f"mem-walk avmm.mib={WALK_MIB} avmm.rounds={WALK_ROUNDS} avmm.rate=1024"
EXPECTED = expected_lines(WALK_MIB, WALK_ROUNDS)

PAUSED_STATUS = {
    "vm": {"state": "paused", "uptime_s": 1.0, "exit": None, "vcpu_threads": [],
           "rate_limits": None},
    "metrics": {"vcpu_exits": {}, "devices": {}},
    "rate_limit_waits": [],
}

# -- the daemon's side, against a fake worker (no KVM) -----------------------------------


@contextmanager
def _fake_worker_vm() -> Iterator[tuple[WorkerVm, Channel]]:
    """A WorkerVm whose worker is the test (the other end of its channel), paused."""
    vm = WorkerVm("vm-snap", guest_config("avmm.test=echo"), start=True, paths=None,
                  isolation=ProcessIsolation(uids=UidAllocator((64900, 64901))))
    ours, theirs = socketpair()
    vm._channel = Channel(ours)
    worker = Channel(theirs)
    vm._status = sanitize_status(json.loads(json.dumps(PAUSED_STATUS)))
    try:
        yield vm, worker
    finally:
        vm._channel.close()
        worker.close()


def _write_small_snapshot(state_fd: int, memory_fd: int, page: bytes) -> None:
    """What an honest worker writes, for a guest of one page (sections: memory only)."""
    os.pwrite(memory_fd, page, 0)
    data_bytes = 0 if page == bytes(len(page)) else len(page)
    digest = hashlib.sha256(struct.pack("<QQ", 0, len(page)) + page if data_bytes else b"")
    image = MemoryImage(file=MEMORY_FILE_NAME, size=len(page),
                        regions=[MemoryRegionImage(guest_address=0, size=len(page),
                                                   file_offset=0)],
                        data_bytes=data_bytes, sha256=digest.digest())
    write_state_fd(state_fd, {MEMORY_SECTION: image})


@pytest.fixture
def one_page_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake worker's snapshots hold the memory section only.
    monkeypatch.setattr(worker_vm, "SNAPSHOT_SECTIONS", {})


async def test_the_worker_is_handed_two_regular_files_and_never_a_directory(
        tmp_path: Path, one_page_snapshots: None) -> None:
    target = tmp_path / "snap"
    seen: dict[str, Any] = {}
    page = b"m" * 4096

    async def fake_worker() -> None:
        message, fds = await worker.receive_with_fds()
        seen["message"] = message
        seen["links"] = [os.readlink(f"/proc/self/fd/{fd}") for fd in fds]
        modes = [os.fstat(fd).st_mode for fd in fds]
        assert len(fds) == 2 and all(stat.S_ISREG(mode) for mode in modes), modes
        assert not any(stat.S_ISDIR(mode) for mode in modes)
        assert [os.fstat(fd).st_size for fd in fds] == [0, 0]  # new and empty
        _write_small_snapshot(fds[0], fds[1], page)
        seen["fds"] = fds  # kept open, as a compromised worker would
        await worker.send({"id": message["id"], "result": {
            **PAUSED_STATUS, "snapshot": {"bytes_state": 5, "bytes_memory": 4096}}})

    with _fake_worker_vm() as (vm, worker):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm._follow)
            nursery.start_soon(fake_worker)
            info = await vm.snapshot(target)
            nursery.cancel_scope.cancel()
    message = seen["message"]
    assert message["op"] == "snapshot" and set(message) == {"id", "op", "path"}, message
    # Two files handed out in the hidden temporary directory, never the snapshot's own.
    assert all(Path(link).parent.name.startswith(".snap.partial-")
               for link in seen["links"]), seen["links"]
    assert not {Path(link).name for link in seen["links"]} & {STATE_FILE_NAME,
                                                               MEMORY_FILE_NAME}
    assert info.path == target and info.bytes_memory == 4096
    assert info.bytes_state == (target / STATE_FILE_NAME).stat().st_size
    assert os.listdir(tmp_path) == ["snap"]
    assert sorted(os.listdir(target)) == [MEMORY_FILE_NAME, STATE_FILE_NAME]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
    # The worker still holds its fds: what it writes now reaches nothing committed (the
    # memory file is mapped into every VM restored from it).
    state_fd, memory_fd = seen["fds"]
    try:
        os.pwrite(memory_fd, b"X" * 4096, 0)
        os.pwrite(state_fd, b"garbage", 0)
    finally:
        os.close(state_fd)
        os.close(memory_fd)
    assert (target / MEMORY_FILE_NAME).read_bytes() == page
    assert (target / STATE_FILE_NAME).read_bytes().startswith(b"AVMMSNAP")


@pytest.mark.parametrize("lie", ["garbage", "memory changed", "memory too large"])
async def test_what_the_worker_wrote_is_checked_before_it_is_kept(
        tmp_path: Path, lie: str, one_page_snapshots: None) -> None:
    """A worker's files are not taken on trust: a state file that does not parse, a
    memory file that is not the image the state records, or one larger than the VM's
    RAM: a SnapshotError, and nothing is left."""
    target = tmp_path / "snap"

    async def fake_worker() -> None:
        message, fds = await worker.receive_with_fds()
        try:
            if lie == "garbage":
                os.pwrite(fds[0], b"state", 0)
                os.pwrite(fds[1], b"m" * 4096, 0)
            else:
                size = 4096 if lie == "memory changed" else (64 << 20) + 4096
                _write_small_snapshot(fds[0], fds[1], b"m" * size)
                if lie == "memory changed":
                    os.pwrite(fds[1], b"n", 100)
        finally:
            for fd in fds:
                os.close(fd)
        await worker.send({"id": message["id"], "result": {
            **PAUSED_STATUS, "snapshot": {"bytes_state": 5, "bytes_memory": 4096}}})

    with _fake_worker_vm() as (vm, worker):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm._follow)
            nursery.start_soon(fake_worker)
            with pytest.raises(SnapshotError):
                await vm.snapshot(target)
            nursery.cancel_scope.cancel()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("answer", ["error", "nonsense", "late"])
async def test_a_snapshot_the_worker_does_not_write_leaves_nothing(
        tmp_path: Path, answer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's error, an answer that makes no sense, or none in time: a
    SnapshotError, no directory (hidden or not) left, the worker not killed (a late
    answer is dropped, not taken for a broken protocol)."""
    monkeypatch.setattr(worker_vm, "SNAPSHOT_TIMEOUT_BASE_S", 0.5)
    monkeypatch.setattr(worker_vm, "SNAPSHOT_TIMEOUT_S_PER_64_MIB", 0.0)
    killed: list[bool] = []

    async def kill() -> None:
        killed.append(True)

    answered = trio.Event()

    async def fake_worker() -> None:
        message, fds = await worker.receive_with_fds()
        for fd in fds:
            os.close(fd)
        if answer == "late":
            await trio.sleep(1)
            reply: dict[str, Any] = {"id": message["id"], "result": PAUSED_STATUS}
        elif answer == "error":
            reply = {"id": message["id"], "error": {
                "type": "SnapshotError", "message": "snap: cannot write the snapshot: ENOSPC"}}
        else:
            reply = {"id": message["id"], "result": {
                **PAUSED_STATUS, "snapshot": {"bytes_memory": 1 << 60}}}
        await worker.send(reply)
        answered.set()

    with _fake_worker_vm() as (vm, worker):
        vm._kill = kill  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm._follow)
            nursery.start_soon(fake_worker)
            with pytest.raises(SnapshotError) as failed:
                await vm.snapshot(tmp_path / "snap")
            with trio.fail_after(5):
                await answered.wait()
            await trio.sleep(0.1)  # the late answer reached _follow, which goes on
            assert not vm._ended.is_set()
            nursery.cancel_scope.cancel()
    assert "\n" not in str(failed.value)
    assert {"error": "ENOSPC", "nonsense": "nonsense",
            "late": "within 0.5 s"}[answer] in str(failed.value)
    assert os.listdir(tmp_path) == []
    assert killed == []
    assert not vm._snapshotting


def test_the_timeout_grows_with_guest_ram() -> None:
    assert worker_vm.snapshot_timeout_s(64) == 31.0
    assert worker_vm.snapshot_timeout_s(4096) == 94.0

# -- through a real daemon and workers -----------------------------------------------------


def _walk_config(memory_mib: int = 64) -> dict[str, Any]:
    return {"machine": {"memory_mib": memory_mib, "acpi": False},
            "boot": {"kernel": str(TEST_GUEST), "cmdline": f"avmm.test={WALK}"}}


async def _read_to_end(api: ApiClient, vm_id: str) -> str:
    """The VM's console until it stops."""
    output = bytearray()
    async with api.console(vm_id) as chunks:
        with trio.fail_after(120):
            async for chunk in chunks:
                output += chunk
    return output.decode(errors="replace")


@pytest.mark.kvm
@pytest.mark.guest
async def test_a_snapshot_taken_in_a_worker_restores_in_a_worker_and_in_none_mode(
        tmp_path: Path) -> None:
    from avmm.host import Host

    target = tmp_path / "snap"
    async with process_daemon() as (daemon, api, _jail_root):
        vm = await api.create_vm(_walk_config())
        vm_id = vm["id"]
        before = bytearray()
        async with api.console(vm_id) as chunks:
            with trio.fail_after(60):
                async for chunk in chunks:
                    before += chunk
                    if b"mem-walk round=1 crc=" in before:
                        break
            assert (await api.pause(vm_id))["state"] == "paused"
            with trio.move_on_after(1):  # what the guest printed before it paused
                async for chunk in chunks:
                    before += chunk
        assert b" done " not in before, "the guest finished before the snapshot"
        taken = await api.snapshot(vm_id, target)
        assert set(taken) == {"path", "bytes_state", "bytes_memory", "duration_ms"}
        assert taken["path"] == str(target)
        assert taken["bytes_state"] == (target / STATE_FILE_NAME).stat().st_size
        assert WALK_MIB * MIB <= taken["bytes_memory"] < 8 * MIB, taken
        # The directory and its two files, nothing else left in the parent.
        assert os.listdir(tmp_path) == ["snap"]
        assert sorted(os.listdir(target)) == [MEMORY_FILE_NAME, STATE_FILE_NAME]
        assert stat.S_IMODE(target.stat().st_mode) == 0o700
        memory = (target / MEMORY_FILE_NAME).stat()
        assert memory.st_size == 64 * MIB
        # Sparse: the RAM the guest never touched is holes.
        assert memory.st_blocks * 512 < 8 * MIB, memory.st_blocks
        _check_worker_fds(vm["pid"])
        # The VM stays paused and usable.
        assert (await api.get_vm(vm_id))["state"] == "paused"
        await api.delete_vm(vm_id)

        restored = await api.restore_vm(target)
        assert restored["isolation"] == "process"
        after = await _read_to_end(api, restored["id"])
        assert mem_walk_lines(before.decode() + after) == EXPECTED, after
        assert "SIGSYS" not in daemon.stderr.read_text()

    # The format is one: the same snapshot restores in none mode.
    async with Host() as host:
        hosted = await host.restore(target)
        output = bytearray()
        async with hosted.subscribe_console() as subscription:
            with trio.fail_after(120):
                async for chunk in subscription:
                    output += chunk
        await hosted.wait()
    assert mem_walk_lines(before.decode() + output.decode()) == EXPECTED, output


@pytest.mark.kvm
@pytest.mark.guest
async def test_snapshot_refusals_are_those_of_none_mode(tmp_path: Path) -> None:
    """Under --allow-path: an existing target, a missing parent, a parent outside, a
    running VM: the statuses and keys of none mode (tests/api/test_snapshot_api.py)."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    shutil.copy(TEST_GUEST, allowed / "guest.elf")
    async with process_daemon("--allow-path", str(allowed)) as (daemon, api, _jail_root):
        vm = await api.create_vm({"machine": {"memory_mib": 32, "acpi": False},
                                  "boot": {"kernel": str(allowed / "guest.elf"),
                                           "cmdline": "avmm.test=echo"}})
        vm_id = vm["id"]
        with pytest.raises(ApiError) as refused:
            await api.snapshot(vm_id, allowed / "s")
        assert refused.value.status == 409 and "pause" in str(refused.value)
        await api.pause(vm_id)
        (allowed / "exists").mkdir()
        (allowed / "escape").symlink_to("../outside")
        for path, status in ((allowed / "exists", 400), (allowed / "missing" / "s", 400),
                             (allowed / "guest.elf" / "s", 400), (outside / "s", 403),
                             (allowed / "escape" / "s", 403)):
            with pytest.raises(ApiError) as refused:
                await api.snapshot(vm_id, path)
            assert refused.value.status == status, (path, refused.value)
            assert refused.value.detail["key"] == "path", (path, refused.value.detail)
        assert sorted(os.listdir(allowed)) == ["escape", "exists", "guest.elf"]
        assert os.listdir(outside) == []
        assert (await api.get_vm(vm_id))["state"] == "paused"
        taken = await api.snapshot(vm_id, allowed / "s")
        assert taken["path"] == str(allowed / "s")
        # `avmm snapshot` as in none mode: a refusal is one line and exit status 1; a
        # snapshot says where it went, and --resume resumes the VM.
        refused_cli = await avmm("snapshot", vm_id, str(allowed / "s"), socket=daemon.socket)
        assert refused_cli.returncode == 1 and refused_cli.stderr.count(b"\n") == 1, \
            refused_cli
        by_cli = await avmm("snapshot", vm_id, str(allowed / "cli"), "--resume",
                            socket=daemon.socket)
        assert by_cli.returncode == 0, by_cli.stderr
        assert by_cli.stdout.startswith(f"{allowed / 'cli'}: state ".encode()), by_cli.stdout
        assert b"resumed" in by_cli.stdout
        assert (await api.get_vm(vm_id))["state"] == "running"
        assert sorted(os.listdir(allowed / "cli")) == [MEMORY_FILE_NAME, STATE_FILE_NAME]
        await api.delete_vm(vm_id)


def _trip_isolation(tmp_path: Path) -> ProcessIsolation:
    """Workers whose snapshot starts late (tests/isolation/trip_worker.py)."""
    from avmm.isolation.seccomp import SeccompMode

    return ProcessIsolation(jail_root=str(tmp_path / "jail"), uids=UidAllocator(UIDS),
                            seccomp=SeccompMode.KILL,
                            worker_module="tests.isolation.trip_worker",
                            module_path=str(Path(__file__).resolve().parents[2]))


async def _until_holding_the_files(pid: int) -> None:
    """Until the worker has the snapshot's files open (it was handed them)."""
    with trio.fail_after(20):
        while not any(".partial-" in os.readlink(f"/proc/{pid}/fd/{fd}")
                      for fd in os.listdir(f"/proc/{pid}/fd")):
            await trio.sleep(0.02)


@pytest.mark.kvm
@pytest.mark.guest
async def test_a_worker_killed_during_its_snapshot_leaves_nothing_and_the_host_serves_on(
        tmp_path: Path) -> None:
    from avmm.host import Host
    from avmm.lifecycle import StopReason, VmState

    _need_root()
    parent = tmp_path / "snaps"
    parent.mkdir()
    async with Host(isolation=_trip_isolation(tmp_path)) as host:
        victim = await host.create(guest_config("avmm.test=echo"))
        await victim.pause()
        failed: list[BaseException] = []

        async def snapshot() -> None:
            try:
                await victim.snapshot(parent / "snap")
            except SnapshotError as e:
                failed.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(snapshot)
            assert victim.pid is not None
            await _until_holding_the_files(victim.pid)
            assert [name for name in os.listdir(parent) if ".partial-" in name]
            os.kill(victim.pid, signal.SIGKILL)
        assert len(failed) == 1 and "worker ended" in str(failed[0]), failed
        assert os.listdir(parent) == []  # hidden names included
        assert (await victim.wait()).reason is StopReason.CRASH
        # The host goes on: another VM runs, pauses and is snapshotted.
        neighbour = await host.create(guest_config("avmm.test=echo"))
        await _echo_here(neighbour, "after the kill")
        await neighbour.pause()
        info = await neighbour.snapshot(parent / "next")
        assert info.path == parent / "next" and os.listdir(parent) == ["next"]
        await neighbour.resume()
        assert neighbour.state is VmState.RUNNING
        await neighbour.stop()


@pytest.mark.kvm
@pytest.mark.guest
async def test_a_worker_too_slow_to_snapshot_is_left_running_and_the_vm_usable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from avmm.host import Host
    from avmm.lifecycle import VmState
    from tests.isolation.trip_worker import SNAPSHOT_DELAY_S

    _need_root()
    parent = tmp_path / "snaps"
    parent.mkdir()
    async with Host(isolation=_trip_isolation(tmp_path)) as host:
        vm = await host.create(guest_config("avmm.test=echo"))
        await vm.pause()
        monkeypatch.setattr(worker_vm, "SNAPSHOT_TIMEOUT_BASE_S", 1.0)
        monkeypatch.setattr(worker_vm, "SNAPSHOT_TIMEOUT_S_PER_64_MIB", 0.0)
        with pytest.raises(SnapshotError, match="within 1 s; nothing was kept"):
            await vm.snapshot(parent / "snap")
        assert os.listdir(parent) == []
        assert vm.pid is not None
        os.kill(vm.pid, 0)  # not killed
        # Its late answer comes and is dropped; the VM is still paused and usable.
        await trio.sleep(SNAPSHOT_DELAY_S)
        monkeypatch.undo()
        await vm.refresh()
        assert vm.state is VmState.PAUSED
        info = await vm.snapshot(parent / "snap")
        assert info.path == parent / "snap" and os.listdir(parent) == ["snap"]
        await vm.resume()
        await _echo_here(vm, "after the slow snapshot")
        await vm.stop()
