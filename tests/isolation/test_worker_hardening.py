"""What a hostile worker could do to the host through what the daemon hands it, and
what keeps it from it: a file size limit on everything it writes (RLIMIT_FSIZE), the
taps put back once it has ended, its PIDs kept from reuse while the daemon uses them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio

from avmm.config import SerialConfig
from avmm.errors import AvmmError
from avmm.host import Host
from avmm.isolation.jail import UidAllocator
from avmm.isolation.worker_vm import ProcessIsolation, WorkerVm
from avmm.lifecycle import StopReason, VmState
from tests.isolation.test_process_mode import UIDS, _echo_here
from tests.prerequisites import require
from tests.vm.helpers import guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


def _need_root() -> None:
    if os.geteuid() != 0:
        require("process isolation needs root (namespaces, mounts, a jail uid)")


def _isolation(tmp_path: Path, **settings: object) -> ProcessIsolation:
    return ProcessIsolation(jail_root=str(tmp_path / "jail"), uids=UidAllocator(UIDS),
                            **settings)  # type: ignore[arg-type]


# -- RLIMIT_FSIZE --------------------------------------------------------------------------


async def test_a_workers_serial_file_stops_growing_at_its_file_size_limit(
    tmp_path: Path, capfd: pytest.CaptureFixture[str],
) -> None:
    """A guest that writes without end to its serial log fills no disk: the worker's
    RLIMIT_FSIZE stops the file at the bound (EFBIG, SIGXFSZ ignored), the worker says
    so once, and the guest runs on."""
    _need_root()
    limit = 100
    (tmp_path / "out").mkdir()
    log = tmp_path / "out" / "serial.log"
    async with Host(isolation=_isolation(tmp_path, max_file_bytes=limit)) as host:
        vm = await host.create(guest_config("avmm.test=echo",
                                            serial=SerialConfig("file", log)))
        assert vm.pid is not None
        limits = Path(f"/proc/{vm.pid}/limits").read_text()
        assert f"Max file size             {limit}                  {limit}" in limits, \
            limits
        for text in ("a" * 80, "b" * 80):
            await _echo_here(vm, text)
        assert log.stat().st_size == limit
        assert vm.state is VmState.RUNNING
        await vm.stop()
    assert "reached the file size limit" in capfd.readouterr().err


def test_the_file_size_limit_covers_what_a_vm_writes_legitimately() -> None:
    from avmm.isolation.jail import file_size_limit
    from avmm.state.format import MAX_STATE_FILE_BYTES

    config = guest_config("avmm.test=echo", memory_mib=512)
    assert file_size_limit(config) == 512 << 20  # a snapshot's memory file
    assert file_size_limit(config, [3 << 30, 1 << 20]) == 3 << 30  # the largest disk
    assert file_size_limit(guest_config("x", memory_mib=16)) == MAX_STATE_FILE_BYTES


def test_a_jail_spec_carries_its_file_size_limit() -> None:
    from avmm.isolation.jail import JailError, JailSpec, plan_jail

    spec = plan_jail(guest_config("x"), "vm-1", uid=64100, gid=64100, max_file_bytes=1 << 30)
    assert JailSpec.from_dict(spec.to_dict()).max_file_bytes == 1 << 30
    assert plan_jail(guest_config("x"), "vm-1", uid=1, gid=1).max_file_bytes is None
    for bad in (0, -1, True, "1", 1 << 63):
        with pytest.raises(JailError, match="max_file_bytes"):
            JailSpec.from_dict({**spec.to_dict(), "max_file_bytes": bad})


# -- taps ----------------------------------------------------------------------------------


def test_no_filter_allows_the_ioctls_that_take_a_tap_over() -> None:
    from avmm.isolation.syscalls import IOCTLS, OTHER_IOCTLS, WORKER_REFUSED_IOCTLS
    from avmm.isolation.taps import TUNSETGROUP, TUNSETOWNER, TUNSETPERSIST

    numbers = {TUNSETPERSIST, TUNSETOWNER, TUNSETGROUP}
    assert not numbers & set(OTHER_IOCTLS.values())
    assert all(not {"TUNSETPERSIST", "TUNSETOWNER", "TUNSETGROUP"} & names
               for names in IOCTLS.values())
    assert "TUNSETIFF" in WORKER_REFUSED_IOCTLS


def _tap_shown(netns: str, name: str) -> str:
    """``ip -d link show`` of a tap ("" if there is none)."""
    result = subprocess.run(["ip", "-n", netns, "-d", "link", "show", "dev", name],
                            capture_output=True, text=True, timeout=30)
    return result.stdout if result.returncode == 0 else ""


async def test_taps_a_worker_took_over_are_put_back_when_it_ends(tmp_path: Path) -> None:
    """A worker whose filter is off makes the taps it was handed persistent and its own
    (the kernel lets it: no capability is checked on an attached fd). Once it has ended,
    killed or stopped, the spawner puts them back: the taps the daemon created for the
    VM are gone, an admin's persistent tap is persistent with its owner and group (an
    owner that was unset is root's: it cannot be unset again)."""
    from avmm.config import NetConfig
    from avmm.host import Host
    from avmm.isolation.seccomp import SeccompMode
    from avmm.isolation.taps import link_ids
    from tests.prerequisites import net_problem
    from tests.virtio_guest_support import TapNamespace

    _need_root()
    require(net_problem())
    isolation = _isolation(tmp_path, seccomp=SeccompMode.OFF,
                           worker_module="tests.isolation.trip_worker",
                           module_path=str(Path(__file__).resolve().parents[2]))
    with TapNamespace("avmmhd0") as space:
        netns = space.netns
        subprocess.run(["ip", "-n", netns, "tuntap", "add", "dev", "avmmhd1", "mode", "tap",
                        "user", "1234", "group", "99"], check=True, timeout=30)
        async with Host(isolation=isolation) as host:
            for end, created in (("kill", "avmmhdnew0"), ("stop", "avmmhdnew1")):
                config = dataclasses.replace(
                    guest_config("avmm.test=echo"),
                    nets=tuple(NetConfig(tap=name, netns=netns)
                               for name in ("avmmhd0", "avmmhd1", created)))
                vm = await host.create(config)
                result = await vm._call("take_taps")
                # Per tap: TUNSETIFF (attached already), TUNSETPERSIST, TUNSETOWNER,
                # TUNSETGROUP.
                assert result["taps"] == ["File exists", "ok", "ok", "ok"] * 3, result
                uid = vm._ids[0]
                shown = _tap_shown(netns, created)
                assert "persist on" in shown and link_ids(created, netns) == (uid, uid), \
                    shown
                if end == "kill":
                    await vm._kill()
                else:
                    await vm.stop()
                await vm.wait()
                assert _tap_shown(netns, created) == "", end
                assert "persist on" in _tap_shown(netns, "avmmhd0")
                assert link_ids("avmmhd0", netns) == (0, 0), end
                assert "persist on" in _tap_shown(netns, "avmmhd1")
                assert link_ids("avmmhd1", netns) == (1234, 99), end


async def test_a_workers_filter_refuses_every_ioctl_that_would_take_a_tap_over(
    tmp_path: Path,
) -> None:
    """In errno mode (kill mode kills the worker for the first): TUNSETIFF (a worker
    never needs it: its taps come attached), TUNSETPERSIST, TUNSETOWNER, TUNSETGROUP."""
    from avmm.config import NetConfig
    from avmm.host import Host
    from avmm.isolation.seccomp import SeccompMode
    from tests.prerequisites import net_problem
    from tests.virtio_guest_support import TapNamespace

    _need_root()
    require(net_problem())
    isolation = _isolation(tmp_path, seccomp=SeccompMode.ERRNO,
                           worker_module="tests.isolation.trip_worker",
                           module_path=str(Path(__file__).resolve().parents[2]))
    with TapNamespace("avmmhd2") as space:
        async with Host(isolation=isolation) as host:
            config = dataclasses.replace(guest_config("avmm.test=echo"), nets=(
                NetConfig(tap=space.tap, netns=space.netns),))
            vm = await host.create(config)
            result = await vm._call("take_taps")
            assert result["taps"] == ["Operation not permitted"] * 4, result
            await _echo_here(vm, "still running")
            await vm.stop()
        assert "persist on" in _tap_shown(space.netns, space.tap)


# -- PIDs ----------------------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``Z``: a zombie), None if there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _nspid(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(number) for number in line.split()[1:]]
    return []


async def test_the_pid_the_daemon_places_stays_the_workers_until_it_lets_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The racy moment, forced: the jailed worker dies (and its reaper ends) between the
    daemon's read of its PID and the write into its VM's cgroup. Its PID must still be
    its own then (a zombie: reaped by nobody, so given to no other process), not free
    for reuse; once the daemon is done with the VM, both processes are reaped."""
    _need_root()
    seen: dict[str, object] = {}
    place = WorkerVm._place

    def racy_place(self: WorkerVm, pid: int) -> None:
        reaper = self._reaper
        assert reaper is not None
        seen["pids"] = (reaper, pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _proc_state(reaper) not in ("Z", None) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["reaper"] = _proc_state(reaper)
        seen["worker"] = _proc_state(pid)
        with contextlib.suppress(OSError):
            seen["nspid"] = _nspid(pid)
        place(self, pid)  # writes a zombie's PID: nobody else's

    monkeypatch.setattr(WorkerVm, "_place", racy_place)
    async with Host(isolation=_isolation(tmp_path)) as host:
        try:
            vm = await host.create(guest_config("avmm.test=echo"), start=False)
        except AvmmError:
            pass  # the worker is dead: a start error is as good as a crash
        else:
            result = await vm.wait()
            assert result.reason is StopReason.CRASH, result
        reaper, pid = seen["pids"]  # type: ignore[misc]
        assert seen["worker"] == "Z", seen  # not reaped: its PID is taken
        assert seen["nspid"] == [pid, 1], seen  # by the jailed worker itself
        assert seen["reaper"] == "Z", seen
        # Let go of once the VM is gone: nothing left behind.
        assert _proc_state(pid) is None and _proc_state(reaper) is None


async def test_a_jailed_worker_that_reset_its_death_signal_dies_with_its_reaper(
        tmp_path: Path) -> None:
    """A worker whose filter is off resets its parent-death signal, then its reaper is
    killed: the spawner kills the jailed process it is left with before it reports the
    worker's end, so that an ended VM leaves no guest running outside the daemon's
    control (its disks and taps still open)."""
    from avmm.isolation.seccomp import SeccompMode

    _need_root()
    isolation = _isolation(tmp_path, seccomp=SeccompMode.OFF,
                           worker_module="tests.isolation.trip_worker",
                           module_path=str(Path(__file__).resolve().parents[2]))
    async with Host(isolation=isolation) as host:
        vm = await host.create(guest_config("avmm.test=echo"))
        assert isinstance(vm, WorkerVm)
        jailed = vm._pid
        assert jailed is not None
        try:
            await vm._call("drop_death_signal")
            with trio.fail_after(30):
                await vm._kill()  # the reaper
                result = await vm.wait()
            assert result.reason is StopReason.CRASH, result
            assert _proc_state(jailed) in ("Z", None)
        finally:
            if _proc_state(jailed) not in ("Z", None):
                os.kill(jailed, signal.SIGKILL)
