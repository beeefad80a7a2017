"""``avmm serve`` killed with SIGKILL leaves its VMs' cgroups behind (nothing ran to
remove them); the next ``avmm serve`` removes them before it serves, in both isolation
modes (the dense daemon's vCPU threads, a worker process each in process mode)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import trio

from avmm.api import ApiClient
from tests.api.test_daemon import running_daemon
from tests.cgroups.conftest import cgroup_cpu_problem
from tests.isolation.test_process_mode import _alive
from tests.prerequisites import require
from tests.vm.helpers import TEST_GUEST

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

UIDS = (64300, 64349)


def _serve_args(isolation: str, scratch: Path) -> list[str]:
    if isolation == "none":
        return []
    return ["--jail-root", str(scratch / "jail"), "--jail-uid-range", f"{UIDS[0]}-{UIDS[1]}"]


@pytest.mark.parametrize("isolation", ["none", "process"])
async def test_the_cgroups_of_a_killed_daemon_are_removed_by_the_next_one(
        isolation: str) -> None:
    require(cgroup_cpu_problem())
    if isolation == "process" and os.geteuid() != 0:
        require("process isolation needs root (namespaces, mounts, a jail uid)")
    config = {"machine": {"memory_mib": 32, "acpi": False, "cpu_weight": 200},
              "boot": {"kernel": str(TEST_GUEST),
                       "cmdline": "avmm.test=count avmm.n=100000000000000"}}
    with tempfile.TemporaryDirectory(prefix="avmm-cgcrash-", dir="/tmp") as name:
        scratch = Path(name)
        first, second = scratch / "first", scratch / "second"
        first.mkdir()
        second.mkdir()
        async with running_daemon(first, isolation=isolation,
                                  serve_args=_serve_args(isolation, first)) as daemon, \
                ApiClient(daemon.socket) as api:
            vm = await api.get_vm((await api.create_vm(config))["id"])
            cgroup = Path(vm["cpu"]["cgroup"])
            assert cgroup.is_dir(), vm["cpu"]
            worker = vm["pid"]
            daemon.process.kill()
            await daemon.process.wait()
        if isolation == "process":
            with trio.fail_after(20):  # the worker dies with its daemon
                while _alive(worker):
                    await trio.sleep(0.05)
        # The crash left the VM's cgroup behind...
        assert cgroup.is_dir()
        owners = [path for path in cgroup.parents if path.name.startswith("pid-")]
        assert owners, cgroup
        # ...and the next daemon removes it, and the dead daemon's owner, before serving.
        async with running_daemon(second, isolation=isolation,
                                  serve_args=_serve_args(isolation, second)):
            assert not cgroup.exists()
            assert not owners[0].exists()
