"""cgroup v2 with process isolation: a domain cgroup per worker process, beside no
process of the daemon's (avmm.cgroups.backend's docstring says why). Against fake
cgroup trees in tmp_path (this project's machines have no cpu controller on their v2
mount): the files written, the layout, a delegated root's processes moved into the
daemon's leaf, run-time changes, removal and the clean-up after a crash; and through
WorkerVm's own placing, which refused v2 before."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from avmm.cgroups import CFS_PERIOD_US, CgroupError, CpuLimits, HostCgroups, V2Backend, VmCpu
from avmm.cgroups.backend import DAEMON_DIR, owner_name, pid_namespace
from avmm.isolation.jail import UidAllocator
from avmm.isolation.worker_vm import ProcessIsolation, WorkerVm
from tests.cgroups.test_backends import dead_pid
from tests.cgroups.test_v2_threaded import run_on_the_real_cgroup2
from tests.vm.helpers import guest_config


def fake_root(tmp_path: Path, *, delegated: bool = False, procs: list[int] | None = None,
              ) -> Path:
    """A v2 tree's root: the hierarchy's own (no ``cgroup.type``), or a cgroup delegated
    to this process (it has a type, and holds ``procs``)."""
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.subtree_control").write_text("")
    if delegated:
        (root / "cgroup.type").write_text("domain\n")
        (root / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in procs or []))
    return root


@pytest.fixture
def child() -> Iterator[int]:
    """A process of this one's (as the worker spawner is the daemon's)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def test_a_workers_vm_gets_a_domain_cgroup_with_its_process_and_limits(
        tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    host = HostCgroups(V2Backend(root))
    vm = VmCpu("db", CpuLimits(weight=300, max_percent=50), host, worker=True)
    vm.prepare()
    cgroup = vm.cgroup
    assert cgroup is not None
    owner = cgroup.parent
    assert owner == root / "avmm" / owner_name() and cgroup.name == "vm-db"
    # cpu handed down on every level above the VM; the VM's cgroup is left a domain
    # (no cgroup.type written: "threaded" would refuse a process).
    for level in (root, root / "avmm", owner):
        assert (level / "cgroup.subtree_control").read_text() == "+cpu", level
    assert not (cgroup / "cgroup.type").exists()
    assert (cgroup / "cpu.weight").read_text() == "300"
    assert (cgroup / "cpu.max").read_text() == "5000 10000"
    # The hierarchy's root may hold processes: the daemon stays where it was started
    # (its unit's cgroup), nothing of it moves, and no daemon leaf is made.
    assert not (owner / "cgroup.procs").exists() and not (owner / DAEMON_DIR).exists()
    vm.place_process(4242)
    assert (cgroup / "cgroup.procs").read_text() == "4242"
    # The vCPU threads are in with their process: no thread id is written (on a real
    # v2 a thread cannot move to another process's domain: EOPNOTSUPP).
    vm.place([(0, 4243)])
    assert not (cgroup / "cgroup.threads").exists()
    vm.update(max_percent=250)
    assert (cgroup / "cpu.max").read_text() == "25000 10000"
    vm.update(clear_max=True, weight=10000)
    assert (cgroup / "cpu.max").read_text() == f"max {CFS_PERIOD_US}"
    assert (cgroup / "cpu.weight").read_text() == "10000"
    (cgroup / "cpu.stat").write_text("usage_usec 1500000\nthrottled_usec 250000\n")
    usage = vm.usage()
    assert (usage.cpu_seconds, usage.throttled_seconds) == (1.5, 0.25)
    described = vm.describe()
    assert described["cgroup_version"] == "v2" and described["cgroup"] == str(cgroup)
    vm.release()
    assert not cgroup.exists()
    # The owner holds no process here: it goes with its last VM (as on v1).
    assert not owner.exists()


def test_a_cgroup_made_at_run_time_takes_the_worker_not_its_threads(tmp_path: Path) -> None:
    """PATCH on a worker's VM started without controls: the cgroup is made, the worker's
    process moved in; the vCPU thread ids known from the start are not written."""
    host = HostCgroups(V2Backend(fake_root(tmp_path)))
    vm = VmCpu("late", CpuLimits(), host, worker=True)
    vm.prepare()
    vm.place_process(77)  # nothing yet: no cgroup
    vm.place([(0, 78)])
    assert vm.cgroup is None
    vm.update(weight=20)
    vm.place_process(77)
    cgroup = vm.cgroup
    assert cgroup is not None
    assert (cgroup / "cpu.weight").read_text() == "20"
    assert (cgroup / "cgroup.procs").read_text() == "77"
    assert not (cgroup / "cgroup.threads").exists()
    vm.release()


def test_a_delegated_roots_daemon_processes_move_into_a_leaf_beside_the_vms(
        tmp_path: Path, child: int) -> None:
    """A delegated root must hand cpu down, so it may hold no process: this process and
    its descendants (the spawner, the reapers) move into <owner>/daemon first; a
    process that is not ours is left (enabling cpu then fails, saying so)."""
    stranger = os.getppid()  # pytest's parent: not a descendant of this process
    root = fake_root(tmp_path, delegated=True, procs=[stranger, os.getpid(), child])
    host = HostCgroups(V2Backend(root))
    first = VmCpu("a", CpuLimits(weight=200), host, worker=True)
    second = VmCpu("b", CpuLimits(max_percent=25), host, worker=True)
    first.prepare()
    second.prepare()
    assert first.cgroup is not None and second.cgroup is not None
    owner = first.cgroup.parent
    daemon = owner / DAEMON_DIR
    assert sorted(int(pid) for pid in (daemon / "cgroup.procs").read_text().split()) == \
        sorted([os.getpid(), child])
    assert second.cgroup.parent == owner
    assert (owner / "cgroup.subtree_control").read_text() == "+cpu"
    first.place_process(501)
    second.place_process(502)
    assert (first.cgroup / "cgroup.procs").read_text() == "501"
    assert (second.cgroup / "cgroup.procs").read_text() == "502"
    first.release()
    second.release()
    assert first.cgroup is None and not (owner / "vm-a").exists()
    # The owner holds the daemon's leaf: it stays until the daemon is gone.
    assert owner.exists() and daemon.exists()


def test_a_crashed_daemons_worker_cgroups_are_removed_on_start(tmp_path: Path) -> None:
    root = fake_root(tmp_path, delegated=True)
    namespace = pid_namespace()
    dead = root / "avmm" / f"pid-{namespace}-{dead_pid()}-12345"
    ours = root / "avmm" / owner_name()
    for path in (dead / DAEMON_DIR, dead / "vm-one", dead / "vm-two", ours / "vm-live"):
        path.mkdir(parents=True)
        (path / "cgroup.procs").write_text("")
    removed = HostCgroups(V2Backend(root)).cleanup_stale()
    assert removed == [dead] and not dead.exists()
    assert (ours / "vm-live").exists()


def test_one_process_cannot_mix_threaded_and_worker_vms_on_v2(tmp_path: Path) -> None:
    host = HostCgroups(V2Backend(fake_root(tmp_path)))
    VmCpu("w", CpuLimits(weight=5), host, worker=True).prepare()
    with pytest.raises(CgroupError, match="not both"):
        VmCpu("t", CpuLimits(weight=5), host).prepare()


def test_place_process_is_only_for_a_workers_vm(tmp_path: Path) -> None:
    host = HostCgroups(V2Backend(fake_root(tmp_path)))
    vm = VmCpu("t", CpuLimits(), host)
    with pytest.raises(ValueError):
        vm.place_process(1)


def test_the_daemon_places_a_worker_on_cgroup_v2(tmp_path: Path) -> None:
    """WorkerVm's own placing (before the guest's first instruction) on a v2 host: the
    VM's domain cgroup with its limits and the worker in it. Until issue 15 this was
    refused ("need the cgroup v1 cpu controller for now")."""
    root = fake_root(tmp_path)
    config = guest_config("avmm.test=hello")
    machine = dataclasses.replace(config.machine, cpu_weight=300, cpu_max_percent=50)
    config = dataclasses.replace(config, machine=machine)
    vm = WorkerVm("vm-v2", config, start=True, paths=None,
                  isolation=ProcessIsolation(uids=UidAllocator((64900, 64901))))
    vm._cpu._host = HostCgroups(V2Backend(root))
    vm._status = {"vm": {"vcpu_threads": [3]}}
    vm._host_tids = {3: 9003}
    vm._place(9001)
    cgroup = root / "avmm" / owner_name() / "vm-vm-v2"
    assert vm._cpu.describe()["cgroup"] == str(cgroup)
    assert (cgroup / "cgroup.procs").read_text() == "9001"
    assert (cgroup / "cpu.weight").read_text() == "300"
    assert (cgroup / "cpu.max").read_text() == "5000 10000"
    vm._release_cpu()
    assert not cgroup.exists()


REAL_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    from pathlib import Path
    from avmm.cgroups import backend
    from avmm.cgroups.backend import DAEMON_DIR, V2Backend, owner_name, read_ids, remove_tree

    mount = Path(sys.argv[1])
    origin = mount / Path("/proc/self/cgroup").read_text().split("0::", 1)[1].split()[0].lstrip("/")
    backend._enable_cpu = lambda path: None  # no cpu controller on a hybrid's v2 mount
    SLEEPER = [sys.executable, "-c", "import threading, time; "
               "threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); "
               "time.sleep(60)"]

    def where(pid, tid=None):
        path = f"/proc/{pid}/cgroup" if tid is None else f"/proc/{pid}/task/{tid}/cgroup"
        return Path(path).read_text().split("0::", 1)[1].split()[0]

    def relative(path):
        inside = path.relative_to(mount).as_posix()
        return "/" if inside == "." else "/" + inside

    # The hierarchy's root: the daemon stays where it is, the worker moves in whole.
    v2 = V2Backend(mount)
    assert not v2.delegated()
    owner = v2.prepare_owner(owner_name(), workers=True)
    dirs = v2.create_vm(owner, "vm-worker-test", workers=True)
    try:
        assert (dirs[0] / "cgroup.type").read_text().strip() == "domain"
        assert where(os.getpid()) == relative(origin)
        worker = subprocess.Popen(SLEEPER)
        try:
            v2.add_process(dirs, worker.pid)
            assert read_ids(dirs[0] / "cgroup.procs") == [worker.pid]
            for tid in os.listdir(f"/proc/{worker.pid}/task"):
                assert where(worker.pid, tid) == relative(dirs[0]), tid
        finally:
            worker.kill()
            worker.wait()
    finally:
        v2.remove_vm(dirs)
        v2.remove_owner(owner)
    assert not dirs[0].exists() and not owner.exists()

    # A delegated root (a cgroup of our own, this process in it, a child born there):
    # both move into the daemon's leaf, the root is left empty.
    test_root = mount / f"avmm-delegation-test-{os.getpid()}"
    test_root.mkdir()
    helper = None
    try:
        (test_root / "cgroup.procs").write_text(str(os.getpid()))
        helper = subprocess.Popen(SLEEPER)
        delegated = V2Backend(test_root)
        assert delegated.delegated()
        owner = delegated.prepare_owner(owner_name(), workers=True)
        leaf = relative(owner / DAEMON_DIR)
        assert where(os.getpid()) == leaf and where(helper.pid) == leaf
        assert read_ids(test_root / "cgroup.procs") == []
        dirs = delegated.create_vm(owner, "vm-worker-test", workers=True)
        worker = subprocess.Popen(SLEEPER)  # born in the daemon's leaf
        try:
            assert where(worker.pid) == leaf
            delegated.add_process(dirs, worker.pid)
            assert where(worker.pid) == relative(dirs[0])
        finally:
            worker.kill()
            worker.wait()
        delegated.remove_vm(dirs)
        assert not dirs[0].exists()
    finally:
        (origin / "cgroup.procs").write_text(str(os.getpid()))
        if helper is not None:
            helper.kill()
            helper.wait()
        remove_tree(test_root, move_to=None, thread_file="cgroup.threads")
    assert not test_root.exists()
    print("worker layout ok")
""")


def test_v2_worker_layout_sequence_on_the_real_kernel() -> None:
    """The order the worker layout writes in, on the real cgroup2 mount without its cpu
    controller (a hybrid's): a domain cgroup made, a whole process with its threads
    moved in and the cgroup removed after it; a delegated root's own processes moved
    into the daemon's leaf. Runs in a child process (it moves itself between cgroups);
    everything it made is removed."""
    assert "worker layout ok" in run_on_the_real_cgroup2(REAL_SCRIPT)
