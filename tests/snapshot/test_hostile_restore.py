"""Restoring, through a daemon restricted with ``--allow-path``, a snapshot an API client
made or changed: the client gets no file outside its directories, cannot kill the
daemon by changing the memory file under a running VM, and the restored VM is one the
daemon could have created (its serial port on the API, not on the daemon's stdout)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from avmm import VirtualMachine
from avmm.api import ApiClient, serve_api
from avmm.config import DiskConfig, SerialConfig
from avmm.errors import PathNotAllowedError, StateError
from avmm.host import Host
from avmm.paths import PathPolicy
from avmm.state import is_memfd_backed
from avmm.state.snapshot import MEMORY_FILE_NAME
from tests.vm.helpers import REPO, guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

SECRET = b"TOP-SECRET-OF-ANOTHER-TENANT"


@pytest.fixture
def area() -> Iterator[Path]:
    """``allowed`` (the daemon's --allow-path) and ``secret`` (outside it), with a short
    path for the API socket."""
    root = Path(tempfile.mkdtemp(prefix="avmm-hostile-", dir="/tmp"))
    (root / "allowed").mkdir()
    (root / "secret").mkdir(mode=0o700)
    yield root
    shutil.rmtree(root, ignore_errors=True)


async def paused_snapshot(path: Path, **kwargs: object) -> None:
    """A snapshot of the test guest before its first instruction."""
    async with VirtualMachine(guest_config("avmm.test=hello", **kwargs),  # type: ignore[arg-type]
                              start_paused=True) as vm:
        await vm.snapshot(path)
        vm.stop()


# -- finding 1, end to end ---------------------------------------------------------------


async def test_a_client_cannot_restore_a_file_outside_its_directories_as_memory(
        area: Path) -> None:
    allowed = area / "allowed"
    await paused_snapshot(allowed / "snap")
    size = os.stat(allowed / "snap" / MEMORY_FILE_NAME).st_size
    victim = area / "secret" / "victim.img"
    with open(victim, "wb") as file:
        file.truncate(size)
        file.seek(0x123000)
        file.write(SECRET)
    os.unlink(allowed / "snap" / MEMORY_FILE_NAME)
    os.symlink(victim, allowed / "snap" / MEMORY_FILE_NAME)
    policy = PathPolicy([allowed])
    try:
        async with Host() as host:
            with pytest.raises(StateError, match=MEMORY_FILE_NAME):
                vm = await host.restore(allowed / "snap", start=False, paths=policy)
                # Without the fix the victim became the guest's RAM: take it back out.
                await vm.snapshot(allowed / "loot", paths=policy)
    finally:
        policy.close()
    loot = allowed / "loot" / MEMORY_FILE_NAME
    assert not loot.exists() or SECRET not in loot.read_bytes()


# -- finding 4, end to end: the daemon's policy applies to the saved config -------------


async def test_a_saved_disk_outside_the_allowed_directories_is_refused_by_the_daemon(
        area: Path) -> None:
    allowed = area / "allowed"
    disk = area / "secret" / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    config = dataclasses.replace(guest_config("avmm.test=hello"),
                                 disks=(DiskConfig(path=disk),))
    async with VirtualMachine(config, start_paused=True) as vm:
        await vm.snapshot(allowed / "snap")
        vm.stop()
    policy = PathPolicy([allowed])
    try:
        async with Host() as host:
            with pytest.raises(PathNotAllowedError) as caught:
                await host.restore(allowed / "snap", start=False, paths=policy)
    finally:
        policy.close()
    assert caught.value.key == "disk[0].path"
    assert str(allowed / "snap" / "state.avmm") in str(caught.value)
    assert "/proc/self/fd" not in str(caught.value)


# -- finding 2: the memory file truncated under a restored VM ----------------------------

_TRUNCATE = r"""
import os, sys, trio
from pathlib import Path
from avmm.host import Host
from avmm.paths import PathPolicy
from avmm.state import is_memfd_backed

allowed = Path(sys.argv[1])
memory_file = allowed / "snap" / "memory.avmm"

async def main():
    policy = PathPolicy([allowed])
    async with Host() as host:
        vm = await host.restore(allowed / "snap", start=False, paths=policy)
        print("mapped" if not is_memfd_backed(vm.vm.memory) else "copied", flush=True)
        os.truncate(memory_file, 0)   # the client, in its own directory
        memory = vm.vm.memory
        total = 0
        for region in memory.regions:   # the daemon touches every page of guest RAM
            view = memory.view(region.guest_address, region.size)
            for offset in range(0, region.size, 4096):
                total += view[offset]
        await vm.snapshot(allowed / "again", paths=policy)
        print("alive", flush=True)
        vm.stop()
    policy.close()

trio.run(main)
"""


def _restore_and_truncate(allowed: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _TRUNCATE, str(allowed)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("change", ["group-writable", "other-owner"])
async def test_truncating_a_memory_file_others_can_write_does_not_kill_the_daemon(
        area: Path, change: str) -> None:
    allowed = area / "allowed"
    await paused_snapshot(allowed / "snap")
    memory_file = allowed / "snap" / MEMORY_FILE_NAME
    if change == "group-writable":
        os.chmod(memory_file, 0o660)
    else:
        os.chown(memory_file, 65534, 65534)  # nobody: a client other than the daemon
    result = await trio.to_thread.run_sync(_restore_and_truncate, allowed)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    assert "copied" in lines and "alive" in lines, result.stdout


async def test_a_memory_file_only_the_daemon_can_write_is_still_mapped(area: Path) -> None:
    allowed = area / "allowed"
    await paused_snapshot(allowed / "snap")
    assert os.stat(allowed / "snap" / MEMORY_FILE_NAME).st_uid == os.geteuid()
    policy = PathPolicy([allowed])
    try:
        async with Host() as host:
            vm = await host.restore(allowed / "snap", start=False, paths=policy)
            assert not is_memfd_backed(vm.vm.memory)
            vm.vm.stop()
    finally:
        policy.close()


# -- finding 7: a restored VM's serial port is the API's in the daemon -------------------


async def test_a_vm_restored_by_the_daemon_has_its_serial_port_on_the_api(
        area: Path, capfd: pytest.CaptureFixture[str]) -> None:
    allowed = area / "allowed"
    await paused_snapshot(allowed / "snap", serial=SerialConfig(mode="console"))
    capfd.readouterr()
    policy = PathPolicy([allowed])
    try:
        async with Host() as host, trio.open_nursery() as nursery:
            socket = await nursery.start(lambda task_status: serve_api(
                host, area / "avmm.sock", paths=policy, task_status=task_status))
            async with ApiClient(socket) as api:
                restored = await api.restore_vm(allowed / "snap")
                hosted = host.get(restored["id"])
                with trio.fail_after(120):
                    await hosted.wait()
            assert hosted.config is not None
            assert hosted.config.serial.mode == "none"
            backlog = hosted.console_backlog()
            nursery.cancel_scope.cancel()
    finally:
        policy.close()
    assert backlog, "the guest printed nothing on the API console"
    assert backlog.decode(errors="replace").strip() not in capfd.readouterr().out
