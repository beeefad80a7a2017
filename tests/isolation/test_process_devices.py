"""Devices of a VM in a jailed worker that tests/isolation/test_process_mode.py does not
cover: a disk served by qemu-storage-daemon (another VMM's back-end, not avmm's), and a
disk whose rate limit is changed by PATCH while the guest waits on it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from tests.isolation.test_process_mode import _config, _run_to_end, process_daemon
from tests.prerequisites import require
from tests.virtio_guest_support import expected_pattern

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

SECTORS = 2048


async def test_a_qemu_storage_daemon_disk_serves_a_vm_in_a_worker(tmp_path: Path) -> None:
    from tests.vhost.test_frontend import storage_daemon

    if shutil.which("qemu-storage-daemon") is None:
        require("qemu-storage-daemon is not installed (make deps installs qemu-system-x86)")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SECTORS * 512))
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    sock = sockets / "qsd.sock"
    async with process_daemon() as (daemon, api, _jail_root):
        with storage_daemon(image, sock):
            config = _config("blk-write avmm.seed=5")
            config["disk"] = [{"vhost_user": str(sock)}]
            vm, output = await _run_to_end(api, config)
        assert vm["isolation"] == "process"
        assert f"blk0 written={SECTORS} verify=ok" in output, (output, vm["exit"])
        log = daemon.stderr.read_text()
        assert "SIGSYS" not in log and "crashed" not in log, log[-3000:]
    assert image.read_bytes() == expected_pattern(5, SECTORS)


async def test_patch_lifts_a_disk_limit_of_a_vm_in_a_worker(tmp_path: Path) -> None:
    """A disk limited to one request a minute holds the guest's writes; PATCH takes
    the limit off and the worker's disk serves the rest at once."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(SECTORS * 512))
    async with process_daemon() as (_daemon, api, _jail_root):
        config = _config("blk-write avmm.seed=6")
        config["disk"] = [{"path": str(disk),
                           "rate_limit": {"ops": {"size": 1, "refill_ms": 60_000}}}]
        vm = await api.create_vm(config)
        with trio.fail_after(60):
            while True:
                limits = (await api.get_vm(vm["id"]))["rate_limits"]["disks"][0]
                assert limits["rate_limit"]["ops"]["size"] == 1, limits
                if limits["throttled"] >= 1:
                    break  # a request is held by the limit
                await trio.sleep(0.1)
        assert (await api.get_vm(vm["id"]))["state"] == "running"
        updated = await api.update_limits(vm["id"], {"disks": [{"index": 0,
                                                               "rate_limit": None}]})
        assert updated["rate_limits"]["disks"][0]["rate_limit"] is None, updated
        with trio.fail_after(120):
            while (await api.get_vm(vm["id"]))["state"] != "stopped":
                await trio.sleep(0.1)
        stopped = await api.get_vm(vm["id"])
    assert stopped["exit"]["reason"] == "reset", stopped["exit"]
    assert disk.read_bytes() == expected_pattern(6, SECTORS)


async def test_the_whole_worker_is_born_in_its_vms_cgroup() -> None:
    """The jailer's order: the VM's cgroup is made, and the process the spawner started
    put in it, before the worker builds anything: the jail's reaper is in it too, and
    so is every thread of the jailed worker."""
    import os

    from tests.cgroups.conftest import cgroup_cpu_problem

    require(cgroup_cpu_problem())
    async with process_daemon() as (_daemon, api, _jail_root):
        config = _config("count avmm.n=100000000000000")
        config["machine"].update(cpu_weight=300)
        vm = await api.get_vm((await api.create_vm(config))["id"])
        cgroup = Path(vm["cpu"]["cgroup"])
        members = {int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()}
        reaper = int(Path(f"/proc/{vm['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert {vm["pid"], reaper} <= members, (vm["pid"], reaper, members)
        threads = {int(tid) for tid in (cgroup / "tasks").read_text().split()}
        assert {int(t) for t in os.listdir(f"/proc/{vm['pid']}/task")} <= threads
        await api.delete_vm(vm["id"])
        assert not cgroup.exists()
