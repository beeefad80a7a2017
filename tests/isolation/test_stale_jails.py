"""``avmm serve --isolation process`` killed with SIGKILL leaves its VMs' jail
directories behind (nothing ran to remove them); the next daemon on the same jail root
removes them before it serves, and never a live daemon's."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import trio

from avmm.api import ApiClient
from tests.api.test_daemon import running_daemon
from tests.isolation.test_process_mode import _alive
from tests.prerequisites import require
from tests.vm.helpers import TEST_GUEST

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

UIDS = (64350, 64399)


async def test_the_jails_of_a_killed_daemon_are_removed_by_the_next_one() -> None:
    if os.geteuid() != 0:
        require("process isolation needs root (namespaces, mounts, a jail uid)")
    config = {"machine": {"memory_mib": 32, "acpi": False},
              "boot": {"kernel": str(TEST_GUEST), "cmdline": "avmm.test=echo"}}
    with tempfile.TemporaryDirectory(prefix="avmm-stalejail-", dir="/tmp") as name:
        scratch = Path(name)
        jail_root = scratch / "jail"
        flags = ["--jail-root", str(jail_root), "--jail-uid-range", f"{UIDS[0]}-{UIDS[1]}"]
        for sub in ("first", "second", "third"):
            (scratch / sub).mkdir()
        async with running_daemon(scratch / "first", isolation="process",
                                  serve_args=flags) as first, \
                ApiClient(first.socket) as api:
            vm = await api.create_vm(config)
            jail = jail_root / vm["id"]
            assert jail.is_dir()
            async with running_daemon(scratch / "second", isolation="process",
                                      serve_args=flags) as second, \
                    ApiClient(second.socket) as other:
                # A live daemon's jail is never another daemon's to remove.
                assert jail.is_dir()
                neighbour = await other.create_vm(config)
                first.process.kill()
                await first.process.wait()
                with trio.fail_after(20):  # the worker dies with its daemon
                    while _alive(vm["pid"]):
                        await trio.sleep(0.05)
                assert jail.is_dir()  # left behind
                async with running_daemon(scratch / "third", isolation="process",
                                          serve_args=flags):
                    assert not jail.exists()
                    assert (jail_root / neighbour["id"]).is_dir()
                    assert (await other.get_vm(neighbour["id"]))["state"] == "running"
