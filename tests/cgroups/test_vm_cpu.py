"""CPU controls on real VMs and the host's real cgroups (v1 on this project's machines,
v2 where the cpu controller is on the unified hierarchy): the mechanism, never timing."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from avmm.cgroups import CgroupError, detect_backend, weight_to_shares
from avmm.cgroups.backend import CFS_PERIOD_US, cfs_period_us, owner_name, quota_us
from avmm.config import ConfigError
from avmm.errors import VmStateError
from avmm.vm import VirtualMachine
from tests.cgroups.conftest import cgroup_cpu_problem
from tests.prerequisites import require
from tests.vm.helpers import guest_config, with_machine

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

SPIN = "avmm.test=count avmm.n=100000000000000"


def read(path: Path) -> str:
    return path.read_text().strip()


def thread_ids(cgroup: Path) -> set[int]:
    name = "tasks" if (cgroup / "tasks").exists() else "cgroup.threads"
    return {int(tid) for tid in read(cgroup / name).split()}


async def running_threads(vm: VirtualMachine, count: int) -> list[int]:
    with trio.fail_after(60):
        while len(vm.vcpu_threads) < count:
            await trio.sleep(0.01)
    return vm.vcpu_threads


def expect_limits(cgroup: Path, weight: int, max_percent: float | None) -> None:
    """The cgroup's files hold ``weight`` and ``max_percent`` over the period avmm picks
    for it (the kernel's default period when there is no quota)."""
    period = CFS_PERIOD_US if max_percent is None else cfs_period_us(max_percent)
    quota = "-1" if max_percent is None else str(quota_us(max_percent))
    if (cgroup / "cpu.shares").exists():  # cgroup v1
        assert read(cgroup / "cpu.shares") == str(weight_to_shares(weight))
        assert read(cgroup / "cpu.cfs_period_us") == str(period)
        assert read(cgroup / "cpu.cfs_quota_us") == quota
    else:
        assert read(cgroup / "cpu.weight") == str(weight)
        assert read(cgroup / "cpu.max").split() == [quota.replace("-1", "max"), str(period)]


async def test_vcpu_threads_sit_in_the_vms_cgroup_with_the_limits_and_affinity_asked() -> None:
    require(cgroup_cpu_problem())
    cpus = sorted(os.sched_getaffinity(0))
    config = with_machine(guest_config(SPIN, vcpus=2, name="cg-limits"), cpu_weight=300,
                          cpu_max_percent=50, cpu_affinity=(cpus[0],),
                          vcpu_affinity=((cpus[0],), (cpus[0],)))
    async with VirtualMachine(config) as vm:
        tids = await running_threads(vm, 2)
        cgroup = vm.cpu_description()["cgroup"]
        assert cgroup is not None
        cgroup_dir = Path(cgroup)
        expect_limits(cgroup_dir, 300, 50)
        # Every vCPU thread is in the VM's cgroup, and only where it was asked to run.
        assert set(tids) <= thread_ids(cgroup_dir)
        for tid in tids:
            assert os.sched_getaffinity(tid) == {cpus[0]}
        # Those are threads of this process.
        assert all(Path(f"/proc/self/task/{tid}").exists() for tid in tids)
        vm.stop()
        await vm.wait()
    # The VM has ended: its cgroup is gone.
    assert not cgroup_dir.exists()


async def test_per_vcpu_affinity_pins_each_vcpu_on_its_own_cpus() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    require(None if len(cpus) >= 2 else "per-vCPU pinning needs two usable host CPUs")
    config = with_machine(guest_config(SPIN, vcpus=2, name="cg-pin"),
                          vcpu_affinity=((cpus[1],), (cpus[0],)))
    async with VirtualMachine(config) as vm:
        await running_threads(vm, 2)
        by_vcpu = {loop.vcpu.id: loop.native_id for loop in vm._loops}
        assert os.sched_getaffinity(by_vcpu[0]) == {cpus[1]}
        assert os.sched_getaffinity(by_vcpu[1]) == {cpus[0]}
        # Affinity alone needs no cgroup.
        assert vm.cpu_description()["cgroup"] is None
        vm.stop()


async def test_a_pinned_vcpus_thread_is_not_reused_once_the_vm_has_ended() -> None:
    """A vCPU's thread is pinned (and may be put in the VM's cgroup): had it come from
    trio's thread cache, the next to_thread job would run pinned, and so would every
    process it starts (trio starts processes from such a job): a daemon's later VM was
    refused a CPU "this host lets avmm use" after a pinned VM had ended."""
    cpus = sorted(os.sched_getaffinity(0))
    require(None if len(cpus) >= 2 else "pinning needs two usable host CPUs")
    config = with_machine(guest_config(SPIN, name="cg-pinned-gone"),
                          cpu_affinity=(cpus[-1],))
    async with VirtualMachine(config) as vm:
        await running_threads(vm, 1)
        assert os.sched_getaffinity(vm._loops[0].native_id) == {cpus[-1]}
        vm.stop()
    # As many jobs at once as it takes to use every idle cached thread (each waits for
    # the others, so no two share a thread): none runs pinned.
    jobs = 16
    barrier = threading.Barrier(jobs, timeout=30)
    seen: list[set[int]] = []

    def job() -> None:
        barrier.wait()
        seen.append(os.sched_getaffinity(0))

    async with trio.open_nursery() as nursery:
        for _ in range(jobs):
            nursery.start_soon(trio.to_thread.run_sync, job)
    assert seen == [set(cpus)] * jobs


async def test_a_vm_that_asks_for_nothing_gets_no_cgroup() -> None:
    async with VirtualMachine(guest_config(SPIN, name="cg-none")) as vm:
        tids = await running_threads(vm, 1)
        assert vm.cpu_description()["cgroup"] is None
        assert vm._loops[0].on_start is None  # no start gate: the path costs nothing
        backend = detect_backend()
        if not isinstance(backend, str):
            assert not (backend.parent / owner_name() / "vm-cg-none").exists()
        assert tids
        vm.stop()


async def test_set_cpu_limits_at_run_time_writes_the_files() -> None:
    require(cgroup_cpu_problem())
    config = with_machine(guest_config(SPIN, name="cg-runtime"), cpu_weight=100)
    async with VirtualMachine(config) as vm:
        tids = await running_threads(vm, 1)
        cgroup = Path(vm.cpu_description()["cgroup"])
        expect_limits(cgroup, 100, None)
        limits = await vm.set_cpu_limits(weight=2500, max_percent=75)
        assert (limits.weight, limits.max_percent) == (2500, 75)
        expect_limits(cgroup, 2500, 75)
        await vm.set_cpu_limits(max_percent=120.5)
        expect_limits(cgroup, 2500, 120.5)
        await vm.set_cpu_limits(clear_max_percent=True)
        expect_limits(cgroup, 2500, None)
        # Across the periods avmm picks (10 ms, 100 ms, 20 ms, 33.4 ms, 100 ms with the
        # kernel's 1 ms floor, 10 ms), each change accepted by the real kernel whatever
        # the period and quota before it.
        for max_percent in (25, 1, 5, 3, 0.5, 50, 120.5):
            await vm.set_cpu_limits(max_percent=max_percent)
            expect_limits(cgroup, 2500, max_percent)
        assert set(tids) <= thread_ids(cgroup)
        with pytest.raises(ConfigError) as bad:
            await vm.set_cpu_limits(weight=0)
        assert bad.value.key == "machine.cpu_weight"
        with pytest.raises(ConfigError) as bad:
            await vm.set_cpu_limits(max_percent=-5)
        assert bad.value.key == "machine.cpu_max_percent"
        expect_limits(cgroup, 2500, 120.5)  # a refused change changes nothing
        usage = await vm.cpu_usage()
        assert usage.cpu_seconds >= 0 and usage.throttled_seconds >= 0
        vm.stop()
        await vm.wait()
        with pytest.raises(Exception) as late:
            await vm.set_cpu_limits(weight=5)
        assert "stop" in str(late.value)
    assert not cgroup.exists()


async def test_set_cpu_limits_on_a_vm_started_without_controls_makes_its_cgroup() -> None:
    require(cgroup_cpu_problem())
    async with VirtualMachine(guest_config(SPIN, name="cg-late")) as vm:
        tids = await running_threads(vm, 1)
        assert vm.cpu_description()["cgroup"] is None
        await vm.set_cpu_limits(max_percent=40)
        cgroup = Path(vm.cpu_description()["cgroup"])
        expect_limits(cgroup, 100, 40)
        assert set(tids) <= thread_ids(cgroup)
        vm.stop()
    assert not cgroup.exists()


async def test_no_cgroup_backend_refuses_cpu_controls_in_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from avmm.cgroups import HostCgroups, vm_cpu

    monkeypatch.setattr(vm_cpu, "_host", HostCgroups("no cgroup cpu controller is mounted"))
    config = with_machine(guest_config(SPIN, name="cg-refused"), cpu_weight=200)
    with pytest.raises(Exception) as refused:
        async with VirtualMachine(config):
            pass
    message = str(refused.value)
    assert "\n" not in message
    assert "cpu_weight/cpu_max_percent cannot be applied" in message
    assert "no cgroup cpu controller is mounted" in message
    assert isinstance(refused.value.__cause__, CgroupError)


async def test_cpu_limits_of_a_vm_not_running_yet_are_refused_and_leave_nothing(
        tmp_path: Path) -> None:
    """Before a VM's machine is built (not entered yet, or waiting for its migration)
    a change would go to a placeholder and its cgroup be left behind (an attacker
    review leaked one per POST /vms/incoming + PATCH + DELETE): refused in one line."""
    require(cgroup_cpu_problem())
    backend = detect_backend()
    assert not isinstance(backend, str)
    before = set(backend.parent.glob("*/vm-*")) if backend.parent.exists() else set()
    unstarted = VirtualMachine(guest_config(SPIN, name="cg-unstarted"))
    with pytest.raises(VmStateError, match="not running yet"):
        await unstarted.set_cpu_limits(weight=200)
    async with VirtualMachine.receive(f"unix:{tmp_path / 'in.sock'}") as incoming:
        with pytest.raises(VmStateError, match="not running yet"):
            await incoming.set_cpu_limits(weight=200)
        incoming.stop()
    after = set(backend.parent.glob("*/vm-*")) if backend.parent.exists() else set()
    assert after <= before
