"""The v1 and v2 backends against fake cgroup trees in tmp_path (both code paths run on
any host, whichever version the real one uses), detection from fake mount tables, the
clean-up of a crashed avmm's cgroups, and CPU lists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from avmm.cgroups import (
    CFS_PERIOD_US,
    CgroupError,
    CpuLimits,
    CpuListError,
    HostCgroups,
    V1Backend,
    V2Backend,
    VmCpu,
    cfs_period_us,
    detect_backend,
    format_cpu_list,
    parse_cpu_list,
    quota_us,
    weight_to_shares,
)
from avmm.cgroups.backend import owner_name, pid_namespace


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def test_weight_maps_to_shares_as_systemd_does() -> None:
    assert weight_to_shares(100) == 1024  # both defaults
    assert weight_to_shares(300) == 3072
    assert weight_to_shares(1) == 10
    assert weight_to_shares(10000) == 102400


@pytest.mark.parametrize(("percent", "period", "quota"), [
    (150, 10_000, 15_000),   # from 10 % up: the shortest period, 10 ms
    (50, 10_000, 5_000),
    (10, 10_000, 1_000),
    (5, 20_000, 1_000),      # below: as short as keeps the kernel's 1 ms quota
    (2.5, 40_000, 1_000),
    (1, 100_000, 1_000),     # the kernel's default period from 1 % down
    (0.01, 100_000, 1_000),  # and the kernel's floor under that
    (1e-310, 100_000, 1_000),  # the config takes any value above 0: no overflow
    (5e-324, 100_000, 1_000),
])
def test_the_period_is_the_shortest_that_keeps_the_quota_at_1_ms(
        percent: float, period: int, quota: int) -> None:
    # Short periods: a vCPU thread throttled while it holds the GIL stalls its
    # process's other VMs for at most the rest of one period (see cfs_period_us).
    assert (cfs_period_us(percent), quota_us(percent)) == (period, quota)
    assert quota_us(percent, 100_000) == max(1000, round(percent * 1000))


def test_v1_a_refused_quota_puts_the_old_period_back(tmp_path: Path) -> None:
    cgroup = tmp_path / "vm"
    cgroup.mkdir()
    (cgroup / "cpu.cfs_period_us").write_text("20000\n")
    (cgroup / "cpu.cfs_quota_us").mkdir()  # any write to it fails, as EINVAL would
    backend = V1Backend(tmp_path, None)
    with pytest.raises(CgroupError, match=r"cpu\.cfs_quota_us"):
        backend.set_limits([cgroup], 100, 50)
    # Not the new period under the old quota (neither limit): the old period again.
    assert (cgroup / "cpu.cfs_period_us").read_text() == "20000"


def test_v1_clearing_the_quota_puts_the_default_period_back(tmp_path: Path) -> None:
    cgroup = tmp_path / "vm"
    cgroup.mkdir()
    backend = V1Backend(tmp_path, None)
    backend.set_limits([cgroup], 100, 50)
    assert (cgroup / "cpu.cfs_period_us").read_text() == "10000"
    backend.set_limits([cgroup], 100, None)
    assert (cgroup / "cpu.cfs_quota_us").read_text() == "-1"
    assert (cgroup / "cpu.cfs_period_us").read_text() == "100000"


def test_v1_backend_writes_shares_quota_and_tids(tmp_path: Path) -> None:
    cpu, acct = tmp_path / "cpu", tmp_path / "cpuacct"
    cpu.mkdir()
    acct.mkdir()
    host = HostCgroups(V1Backend(cpu, acct))
    vm = VmCpu("web 1", CpuLimits(weight=300, max_percent=150), host)
    vm.prepare()
    cgroup = vm.cgroup
    assert cgroup is not None
    owner = cgroup.parent
    assert cgroup == cpu / "avmm" / owner_name() / "vm-web_1"
    assert (cgroup / "cpu.shares").read_text() == "3072"
    assert (cgroup / "cpu.cfs_period_us").read_text() == "10000"
    assert (cgroup / "cpu.cfs_quota_us").read_text() == "15000"
    vm.place([(0, 101), (1, 102)])
    twin = acct / "avmm" / owner.name / "vm-web_1"
    # Every thread in the cpu hierarchy's tasks and in cpuacct's (mounted apart here).
    assert (cgroup / "tasks").read_text().split() == ["101", "102"]
    assert (twin / "tasks").read_text().split() == ["101", "102"]
    vm.update(weight=50, clear_max=True)
    assert (cgroup / "cpu.shares").read_text() == "512"
    assert (cgroup / "cpu.cfs_quota_us").read_text() == "-1"
    (twin / "cpuacct.usage").write_text("2500000000\n")
    (cgroup / "cpu.stat").write_text("nr_periods 9\nnr_throttled 3\nthrottled_time 750000000\n")
    usage = vm.usage()
    assert (usage.cpu_seconds, usage.throttled_seconds) == (2.5, 0.75)
    assert vm.describe()["cpu_shares"] == 512
    vm.release()
    assert not cgroup.exists() and not twin.exists()
    # The last VM gone: v1's owner cgroup goes too.
    assert not owner.exists()
    assert vm.usage().cpu_seconds == 2.5  # the final count stays


def test_v1_co_mounted_cpu_cpuacct_uses_one_directory(tmp_path: Path) -> None:
    root = tmp_path / "cpu,cpuacct"
    root.mkdir()
    host = HostCgroups(V1Backend(root, root))
    vm = VmCpu("a", CpuLimits(weight=100), host)
    vm.prepare()
    assert vm.cgroup is not None
    vm.place([(0, 7)])
    (vm.cgroup / "cpuacct.usage").write_text("1000000000")
    assert vm.usage().cpu_seconds == 1.0
    assert [p.name for p in (root / "avmm").iterdir()] == [vm.cgroup.parent.name]
    vm.release()


def test_v2_backend_makes_a_threaded_subtree(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.subtree_control").write_text("")
    host = HostCgroups(V2Backend(root))
    vm = VmCpu("db", CpuLimits(weight=300, max_percent=50), host)
    vm.prepare()
    cgroup = vm.cgroup
    assert cgroup is not None
    owner = cgroup.parent
    assert owner.parent == root / "avmm"
    # cpu enabled on every level above the VM, the process in its owner (the threaded
    # domain), the VM's cgroup threaded.
    assert (root / "cgroup.subtree_control").read_text() == "+cpu"
    assert (root / "avmm" / "cgroup.subtree_control").read_text() == "+cpu"
    assert (owner / "cgroup.subtree_control").read_text() == "+cpu"
    assert (owner / "cgroup.procs").read_text() == str(os.getpid())
    assert (cgroup / "cgroup.type").read_text() == "threaded"
    assert (cgroup / "cpu.weight").read_text() == "300"
    assert (cgroup / "cpu.max").read_text() == "5000 10000"
    vm.place([(0, 201), (1, 202)])
    assert (cgroup / "cgroup.threads").read_text().split() == ["201", "202"]
    vm.update(max_percent=250)
    assert (cgroup / "cpu.max").read_text() == "25000 10000"
    vm.update(clear_max=True, weight=10000)
    assert (cgroup / "cpu.max").read_text() == f"max {CFS_PERIOD_US}"
    assert (cgroup / "cpu.weight").read_text() == "10000"
    (cgroup / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1\nsystem_usec 2\n"
                                     "nr_periods 4\nnr_throttled 2\nthrottled_usec 250000\n")
    usage = vm.usage()
    assert (usage.cpu_seconds, usage.throttled_seconds) == (1.5, 0.25)
    assert vm.describe()["cgroup_version"] == "v2"
    vm.release()
    assert not cgroup.exists()
    assert owner.exists()  # it holds the process itself: removed after a crash only


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_stale_owner_of_a_dead_process_is_removed_on_start(tmp_path: Path,
                                                           version: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    backend = V1Backend(root, root) if version == "v1" else V2Backend(root)
    parent = root / "avmm"
    # A crashed avmm (its PID gone) left an owner with a VM in it; a reused PID (this
    # process, another start time) counts as gone too; ours and foreign names stay, and
    # so does an owner of another PID namespace (its PID means nothing here: an avmm in
    # a container may be running it).
    namespace = pid_namespace()
    dead = parent / f"pid-{namespace}-{dead_pid()}-12345" / "vm-old"
    reused = parent / f"pid-{namespace}-{os.getpid()}-1" / "vm-other"
    ours = parent / owner_name() / "vm-live"
    foreign = parent / "not-an-owner"
    elsewhere = parent / f"pid-{namespace + 1}-{dead_pid()}-12345" / "vm-contained"
    for path in (dead, reused, ours, foreign, elsewhere):
        path.mkdir(parents=True)
        (path / "tasks").write_text("")
    removed = HostCgroups(backend).cleanup_stale()
    assert sorted(removed) == sorted([dead.parent, reused.parent])
    assert not dead.parent.exists() and not reused.parent.exists()
    assert ours.exists() and foreign.exists() and elsewhere.exists()


def test_no_backend_refuses_with_one_line_and_cleans_nothing() -> None:
    host = HostCgroups("cgroup v1's cpu hierarchy at /x is writable only by root")
    vm = VmCpu("a", CpuLimits(max_percent=10), host)
    with pytest.raises(CgroupError) as refused:
        vm.prepare()
    assert str(refused.value) == ("cpu_weight/cpu_max_percent cannot be applied on this "
                                  "host: cgroup v1's cpu hierarchy at /x is writable only "
                                  "by root")
    assert host.cleanup_stale() == []
    # Affinity alone needs no cgroup.
    VmCpu("b", CpuLimits(affinity=(0,)), host).prepare()


def test_a_failed_cgroup_write_is_one_line_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "cpu"
    root.mkdir()
    host = HostCgroups(V1Backend(root, root))
    vm = VmCpu("a", CpuLimits(weight=5), host)
    vm.prepare()
    assert vm.cgroup is not None
    (vm.cgroup / "cpu.shares").unlink()
    (vm.cgroup / "cpu.shares").mkdir()  # the write now fails (EISDIR)
    with pytest.raises(CgroupError) as failed:
        vm.update(weight=7)
    assert "cpu.shares" in str(failed.value) and "\n" not in str(failed.value)
    assert vm.limits.weight == 5  # not in force


def write_mounts(tmp_path: Path, lines: list[str], own: str = "0::/\n") -> tuple[Path, Path]:
    mounts = tmp_path / "mounts"
    mounts.write_text("".join(line + "\n" for line in lines))
    cgroup = tmp_path / "cgroup"
    cgroup.write_text(own)
    return mounts, cgroup


def test_detection_prefers_v2_with_cpu_then_v1(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("hugetlb\n")
    (unified / "cgroup.subtree_control").write_text("")
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    lines = [f"cgroup2 {unified} cgroup2 rw 0 0", f"cgroup {cpu} cgroup rw,cpu 0 0",
             f"cgroup {tmp_path / 'cpuacct'} cgroup rw,cpuacct 0 0"]
    mounts, own = write_mounts(tmp_path, lines)
    # This project's hybrid: v2 without cpu, so v1.
    found = detect_backend(mounts_file=mounts, cgroup_file=own)
    assert isinstance(found, V1Backend)
    assert found.parent == cpu / "avmm" and found.acct_parent == tmp_path / "cpuacct" / "avmm"
    # Pure v2 with the cpu controller.
    (unified / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    found = detect_backend(mounts_file=mounts, cgroup_file=own)
    assert isinstance(found, V2Backend) and found.parent == unified / "avmm"


def test_detection_says_why_nothing_can_be_used(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("hugetlb\n")
    mounts, own = write_mounts(tmp_path, [f"cgroup2 {unified} cgroup2 rw 0 0"])
    reason = detect_backend(mounts_file=mounts, cgroup_file=own)
    assert isinstance(reason, str) and "\n" not in reason
    assert "has no cpu controller" in reason
    mounts, own = write_mounts(tmp_path, ["proc /proc proc rw 0 0"])
    assert detect_backend(mounts_file=mounts, cgroup_file=own) == \
        "no cgroup cpu controller is mounted"


def test_cpu_lists() -> None:
    usable = range(8)
    assert parse_cpu_list("0-1,3", usable=usable) == (0, 1, 3)
    assert parse_cpu_list(" 5 , 2-3,3", usable=usable) == (2, 3, 5)
    assert parse_cpu_list([3, 1, 1], usable=usable) == (1, 3)
    assert format_cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    for bad in ("", "1-", "a", "3-1", "0-99999", [], [True], ["1"], [-1], 3, None):
        with pytest.raises(CpuListError):
            parse_cpu_list(bad, usable=usable)
    with pytest.raises(CpuListError) as outside:
        parse_cpu_list("6-9", usable=usable)
    assert str(outside.value) == ("CPU 8-9 is not one this host lets avmm use "
                                  "(usable: 0-7)")
    # Refused before anything is expanded (an attacker review made a 256 KiB list of
    # wide ranges take 7 s of CPU, under the GIL, in the daemon).
    for huge in (",".join(["0-8191"] * 40000), list(range(9000))):
        with pytest.raises(CpuListError, match="too long"):
            parse_cpu_list(huge, usable=usable)
    with pytest.raises(CpuListError, match="CPU 8-8191 is not"):
        parse_cpu_list("0-8191,1", usable=usable)


def test_two_vms_with_one_name_get_two_cgroups(tmp_path: Path) -> None:
    root = tmp_path / "cpu"
    root.mkdir()
    host = HostCgroups(V1Backend(root, root))
    first = VmCpu("web", CpuLimits(weight=100), host)
    second = VmCpu("web", CpuLimits(weight=200), host)
    first.prepare()
    second.prepare()
    assert first.cgroup is not None and second.cgroup is not None
    assert (first.cgroup.name, second.cgroup.name) == ("vm-web", "vm-web.2")
    assert (second.cgroup / "cpu.shares").read_text() == "2048"
    first.release()
    assert second.cgroup.exists()  # the other VM's cgroup is untouched
    second.release()
    assert not (root / "avmm" / owner_name()).exists()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_vm_cgroup_made_halfway_is_removed(tmp_path: Path, version: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure in the middle of making a VM's cgroup (v1: its cpuacct twin; v2: its
    threaded type) leaves no directory behind (attacker review: they leaked)."""
    import avmm.cgroups.backend as backend_module

    if version == "v1":
        cpu, acct = tmp_path / "cpu", tmp_path / "cpuacct"
        cpu.mkdir()
        acct.mkdir()
        backend: V1Backend | V2Backend = V1Backend(cpu, acct)
        owner = backend.prepare_owner(owner_name())
        (acct / "avmm" / owner.name).rmdir()  # the twin's parent is gone: mkdir fails
    else:
        root = tmp_path / "root"
        root.mkdir()
        backend = V2Backend(root)
        owner = root / "avmm" / owner_name()
        owner.mkdir(parents=True)
        real = backend_module.write_file

        def refuse_type(path: Path, value: str) -> None:
            if path.name == "cgroup.type":
                raise CgroupError(f"cannot write {value!r} to {path}: refused")
            real(path, value)

        monkeypatch.setattr(backend_module, "write_file", refuse_type)
    with pytest.raises(CgroupError):
        backend.create_vm(owner, "vm-half")
    assert not (owner / "vm-half").exists()
