"""HostedVm's side of a migration with a real VM and a stand-in for the engine's
``VirtualMachine.migrate`` (the engine's own behaviour is tested in tests/migration):
the migration runs in the VM's task, pause/resume/snapshot and a second migration are
refused meanwhile, a failure leaves the VM running with the reason shown, and a new
migration never shows the previous one's progress."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from avmm.api import ApiClient, serve_api
from avmm.config import config_from_dict
from avmm.errors import AvmmError, PathNotAllowedError, VmStateError
from avmm.host import Host
from avmm.lifecycle import StopReason, VmState
from avmm.migration.errors import MigrationError
from avmm.paths import PathPolicy
from avmm.vm import VirtualMachine
from tests.vm.helpers import TEST_GUEST

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


class StandInError(AvmmError):
    """What the stand-in engine raises (the real one raises MigrationError)."""


class StandIn:
    """Replaces VirtualMachine.migrate: reports progress, then fails when told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.go_on = trio.Event()
        self.started = trio.Event()

    async def migrate(self, vm: Any, to: str, *, downtime_ms: int = 300) -> None:
        self.calls.append((to, downtime_ms))
        vm.migration = {"state": "precopy", "round": 1, "pages_sent": 100,
                        "pages_dirty": 7, "bytes_sent": 409600, "downtime_ms": None,
                        "total_ms": 5.0}
        self.started.set()
        await self.go_on.wait()
        vm.migration = {**vm.migration, "state": "failed"}
        raise StandInError("the destination refused the stream")


@pytest.fixture
def area() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="avmm-mig-host-", dir="/tmp"))
    for name in ("allowed", "outside"):
        (root / name).mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


async def _until(predicate: Any) -> None:
    with trio.fail_after(60):
        while not predicate():
            await trio.sleep(0.01)


async def test_a_migration_runs_in_the_vm_task_and_a_failure_leaves_it_running(
        monkeypatch: pytest.MonkeyPatch, area: Path) -> None:
    stand_in = StandIn()

    async def migrate(vm: Any, to: str, *, downtime_ms: int = 300,
                      connected: Any = None) -> None:
        assert connected is None  # a VM in this process connects itself
        await stand_in.migrate(vm, to, downtime_ms=downtime_ms)

    monkeypatch.setattr(VirtualMachine, "migrate", migrate, raising=False)
    monkeypatch.setattr(VirtualMachine, "migration", None, raising=False)
    config = config_from_dict({"machine": {"memory_mib": 32, "acpi": False},
                               "boot": {"kernel": str(TEST_GUEST),
                                        "cmdline": "avmm.test=echo"},
                               "serial": {"mode": "none"}}, base_dir=None)
    policy = PathPolicy([area / "allowed"])
    try:
        async with Host() as host:
            hosted = await host.create(config)
            assert hosted.migration is None
            assert hosted.to_dict()["migration"] is None
            with pytest.raises(PathNotAllowedError) as refused:
                await hosted.start_migration(f"unix:{area}/outside/dest.sock",
                                             paths=policy)
            assert refused.value.key == "to"
            assert hosted.migration is None and not stand_in.calls

            await hosted.start_migration(f"unix:{area}/allowed/dest.sock",
                                         downtime_ms=50, paths=policy)
            assert hosted.migrating
            assert hosted.migration is not None
            assert hosted.migration["state"] == "setup"  # before the engine began
            with trio.fail_after(60):
                await stand_in.started.wait()
            assert stand_in.calls == [(f"unix:{area}/allowed/dest.sock", 50)]
            shown = hosted.to_dict()["migration"]
            assert (shown["state"], shown["round"], shown["pages_dirty"]) == (
                "precopy", 1, 7)
            for refused_call in (hosted.pause, hosted.resume):
                with pytest.raises(VmStateError, match="being migrated"):
                    await refused_call()
            with pytest.raises(VmStateError, match="already being migrated"):
                await hosted.start_migration("tcp:127.0.0.1:4444")

            stand_in.go_on.set()
            await _until(lambda: not hosted.migrating)
            assert hosted.state is VmState.RUNNING
            failed = hosted.migration
            assert failed is not None
            assert (failed["state"], failed["error"]) == (
                "failed", "the destination refused the stream")

            # Again: the previous migration's progress is not shown as this one's.
            stand_in.started = trio.Event()
            stand_in.go_on = trio.Event()
            await hosted.start_migration("tcp:127.0.0.1:4444")
            again = hosted.migration
            assert again is not None and (again["state"], again["error"]) == ("setup", None)
            stand_in.go_on.set()
            await _until(lambda: not hosted.migrating)
            # The waiting form, as an embedding program would use it.
            with pytest.raises(StandInError):
                await hosted.migrate("tcp:127.0.0.1:4444")
            assert len(stand_in.calls) == 3
            assert hosted.state is VmState.RUNNING
            await hosted.pause()
            with pytest.raises(VmStateError, match="only a running VM"):
                await hosted.start_migration("tcp:127.0.0.1:4444")
            await host.remove(hosted.id)
    finally:
        policy.close()



async def test_an_incoming_vm_that_gets_garbage_ends_without_running(area: Path) -> None:
    policy = PathPolicy([area / "allowed"])
    try:
        async with Host() as host:
            with pytest.raises(PathNotAllowedError) as refused:
                await host.receive(f"unix:{area}/outside/in.sock", paths=policy)
            assert refused.value.key == "listen"
            assert host.list() == []

            socket_path = area / "allowed" / "in.sock"
            hosted = await host.receive(f"unix:{socket_path}", paths=policy)
            assert hosted.state is VmState.INCOMING
            shown = hosted.to_dict()
            assert shown["config"] is None  # it comes with the stream
            assert shown["migration"]["state"] == "incoming"
            assert shown["uptime_s"] is None
            stream = await trio.open_unix_socket(str(socket_path))
            await stream.send_all(b"this is no migration stream" * 100)
            with trio.fail_after(60):
                result = await hosted.wait()
            await stream.aclose()
            assert hosted.state is VmState.STOPPED
            assert result.failed and "\n" not in result.detail
            assert hosted.uptime_s is None  # it never ran
            assert hosted.migration is not None and hosted.migration["state"] == "failed"
            assert not socket_path.exists()

            # Leaving one that waits for a stream stops listening.
            waiting = await host.receive(f"unix:{socket_path}", paths=policy)
            assert socket_path.exists()
            with trio.fail_after(60):
                await host.remove(waiting.id)
            assert not socket_path.exists()
            ended = await waiting.wait()
            assert (ended.reason, ended.failed) == (StopReason.STOPPED, False)
    finally:
        policy.close()


async def test_a_migration_to_nobody_fails_and_the_vm_runs_on(area: Path) -> None:
    config = config_from_dict({"machine": {"memory_mib": 32, "acpi": False},
                               "boot": {"kernel": str(TEST_GUEST),
                                        "cmdline": "avmm.test=echo"},
                               "serial": {"mode": "none"}}, base_dir=None)
    async with Host() as host:
        hosted = await host.create(config)
        with trio.fail_after(120), pytest.raises(MigrationError):
            await hosted.migrate(f"unix:{area}/allowed/nobody.sock")
        assert hosted.state is VmState.RUNNING and not hosted.migrating
        failed = hosted.to_dict()["migration"]
        assert failed["state"] == "failed"
        assert "nobody.sock" in failed["error"] and "\n" not in failed["error"]
        await hosted.pause()  # usable again
        await hosted.resume()
        await host.remove(hosted.id)


def _echo_config(kernel: Path = TEST_GUEST) -> Any:
    return config_from_dict({"machine": {"memory_mib": 32, "acpi": False},
                             "boot": {"kernel": str(kernel), "cmdline": "avmm.test=echo"},
                             "serial": {"mode": "none"}}, base_dir=None)


async def test_the_up_front_refusal_is_the_vm_public_migration_problem(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """HostedVm asks the engine's public ``migration_problem()`` (a vhost-user back-end
    that cannot log its writes, here stood in for), before anything starts."""
    monkeypatch.setattr(VirtualMachine, "migration_problem",
                        lambda vm: "the back-end 'disk0' cannot log its writes")
    async with Host() as host:
        hosted = await host.create(_echo_config())
        with pytest.raises(MigrationError, match="'disk0' cannot log its writes"):
            await hosted.start_migration("tcp:127.0.0.1:4444")
        assert hosted.state is VmState.RUNNING and not hosted.migrating
        assert hosted.migration is None
        await host.remove(hosted.id)


class SwappingPolicy(PathPolicy):
    """A policy under which, right after the up-front check of a socket path, that path
    is replaced by a symlink to another socket outside the allowed directory: the race
    an attacker with write access to the allowed directory could win."""

    def __init__(self, allowed: Path, elsewhere: Path) -> None:
        super().__init__([allowed])
        self.elsewhere = elsewhere
        self.swapped = False

    def check(self, path: Path, key: str, kind: Any) -> None:
        super().check(path, key, kind)
        if key == "to":
            os.unlink(path)
            os.symlink(self.elsewhere, path)
            self.swapped = True


async def test_a_unix_destination_swapped_for_a_symlink_after_the_check_is_not_reached(
        area: Path) -> None:
    checked = area / "allowed" / "dest.sock"
    decoy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    decoy.bind(str(checked))  # a socket that passes the check; nobody listens on it
    decoy.close()
    elsewhere = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    elsewhere.bind(str(area / "outside" / "other.sock"))
    elsewhere.listen(1)
    elsewhere.setblocking(False)
    kernel = area / "allowed" / "guest.elf"
    shutil.copyfile(TEST_GUEST, kernel)
    policy = SwappingPolicy(area / "allowed", area / "outside" / "other.sock")
    try:
        async with Host() as host:
            hosted = await host.create(_echo_config(kernel), paths=policy)
            with trio.fail_after(120), pytest.raises(MigrationError) as failed:
                await hosted.migrate(f"unix:{checked}", paths=policy)
            assert policy.swapped
            assert "outside the directories" in str(failed.value)
            assert hosted.state is VmState.RUNNING
            with pytest.raises(BlockingIOError):
                elsewhere.accept()  # the socket outside was never connected to
            await host.remove(hosted.id)
    finally:
        elsewhere.close()
        policy.close()


async def test_an_incoming_vm_with_accept_timeout_s_ends_when_nobody_connects(
        area: Path) -> None:
    async with Host() as host:
        with pytest.raises(MigrationError, match="accept_timeout_s"):
            await host.receive(f"unix:{area}/allowed/in.sock", accept_timeout_s=-1)
        assert host.list() == []
        socket_path = area / "allowed" / "in.sock"
        hosted = await host.receive(f"unix:{socket_path}", accept_timeout_s=0.2)
        with trio.fail_after(60):
            result = await hosted.wait()
        assert result.reason is StopReason.ERROR and "no source connected" in result.detail
        assert hosted.migration is not None and hosted.migration["state"] == "failed"
        assert not socket_path.exists()


async def test_over_http_an_incoming_vm_ends_on_delete_stop_or_its_accept_timeout(
        area: Path) -> None:
    """The daemon's API on a real Host: DELETE and POST .../stop end an incoming VM
    that no source has connected to (its socket released), and accept_timeout_s ends
    one by itself."""
    async with Host() as host, trio.open_nursery() as nursery:
        path = await nursery.start(serve_api, host, area / "avmm.sock")
        async with ApiClient(path) as api:
            deleted_path = area / "allowed" / "deleted.sock"
            deleted = await api.receive_vm(f"unix:{deleted_path}")
            assert deleted["state"] == "incoming" and deleted_path.exists()
            with trio.fail_after(60):
                await api.delete_vm(deleted["id"])
            assert not deleted_path.exists()
            assert deleted["id"] not in [vm["id"] for vm in await api.list_vms()]

            stopped_path = area / "allowed" / "stopped.sock"
            waiting = await api.receive_vm(f"unix:{stopped_path}")
            with trio.fail_after(60):
                stopped = await api.stop(waiting["id"])
            assert stopped["state"] == "stopped"
            assert stopped["exit"]["reason"] == "stopped"
            assert not stopped_path.exists()

            timed_path = area / "allowed" / "timed.sock"
            timed = await api.receive_vm(f"unix:{timed_path}", accept_timeout_s=0.2)
            with trio.fail_after(60):
                while (shown := await api.get_vm(timed["id"]))["state"] != "stopped":
                    await trio.sleep(0.05)
            assert shown["exit"]["reason"] == "error"
            assert "no source connected within 0.2 s" in shown["exit"]["detail"]
            assert shown["migration"]["state"] == "failed"
            assert not timed_path.exists()
        nursery.cancel_scope.cancel()
