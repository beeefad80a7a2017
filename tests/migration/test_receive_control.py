"""The library's control over migrations that have not begun: why a VM cannot be
migrated now (``vm.migration_problem()``), an incoming VM stopped with ``vm.stop()``
before any source connected, an incoming VM that gives up waiting
(``accept_timeout_s``), and a ``unix:`` destination reached through the VM's path
policy (never by a name that a symlink may have redirected)."""

from __future__ import annotations

import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmState
from avmm.migration import MigrationError
from avmm.migration.stream import Channel, Kind
from avmm.paths import PathPolicy
from avmm.state.codec import encode
from avmm.state.vm_state import config_to_state
from tests.vm.helpers import TEST_GUEST

from .support import TIMEOUT_S, guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


@pytest.fixture
def area() -> Iterator[Path]:
    """A short directory (unix socket paths are at most 107 bytes) with ``allowed`` and
    ``outside`` inside."""
    root = Path(tempfile.mkdtemp(prefix="avmm-mig-ctl-", dir="/tmp"))
    for name in ("allowed", "outside"):
        (root / name).mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


async def test_migration_problem_says_why_a_vm_cannot_be_migrated_now() -> None:
    vm = VirtualMachine(guest_config("avmm.test=echo"))
    before = vm.migration_problem()
    assert before is not None and "starting" in before and "\n" not in before
    with trio.fail_after(TIMEOUT_S):
        async with vm:
            assert vm.migration_problem() is None
            await vm.pause()
            assert vm.migration_problem() is None  # a paused VM migrates, and stays paused
            await vm.resume()
            vm.stop()
            await vm.wait()
    after = vm.migration_problem()
    assert after is not None and "stopped" in after
    with pytest.raises(MigrationError, match="stopped"):
        await vm.migrate("unix:/nonexistent/never.sock")


async def test_stop_ends_an_incoming_vm_that_no_source_connected_to(area: Path) -> None:
    socket_path = area / "allowed" / "in.sock"
    with trio.fail_after(TIMEOUT_S):
        async with VirtualMachine.receive(f"unix:{socket_path}") as vm:
            assert vm.state is VmState.INCOMING and socket_path.exists()
            vm.stop("not wanted after all")
            # vm.stop() alone ends it: no leaving the context needed (30 s: a bound for
            # a hang, not a speed target).
            with trio.fail_after(30):
                result = await vm.wait()
            assert vm.state is VmState.STOPPED
            assert (result.reason, result.failed) == (StopReason.STOPPED, False)
            assert result.detail == "not wanted after all"
            assert not socket_path.exists()  # it no longer listens
            assert vm.migration is not None and vm.migration.state == "failed"
            with pytest.raises(OSError):
                await trio.open_unix_socket(str(socket_path))


async def test_an_incoming_vm_gives_up_after_accept_timeout_s(area: Path) -> None:
    socket_path = area / "allowed" / "in.sock"
    with trio.fail_after(TIMEOUT_S):
        async with VirtualMachine.receive(f"unix:{socket_path}",
                                          accept_timeout_s=0.2) as vm:
            result = await vm.wait()
            assert result.reason is StopReason.ERROR and result.failed
            assert "no source connected within 0.2 s" in result.detail
            assert "\n" not in result.detail
            assert not socket_path.exists()
            assert vm.migration is not None and vm.migration.state == "failed"
            assert "no source connected" in (vm.migration.error or "")

        # Over TCP the port is released too: nobody answers there any more.
        async with VirtualMachine.receive("tcp:127.0.0.1:0", accept_timeout_s=0.2) as vm:
            assert vm.migration is not None
            port = int(vm.migration.address.rsplit(":", 1)[1])
            result = await vm.wait()
            assert result.reason is StopReason.ERROR
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)

        # A source that connects in time is not cut off by the timeout later: the wait
        # covers the accept only (here the stream is garbage, refused as such).
        async with VirtualMachine.receive(f"unix:{socket_path}",
                                          accept_timeout_s=30) as vm:
            stream = await trio.open_unix_socket(str(socket_path))
            await stream.send_all(b"no migration stream" * 10)
            result = await vm.wait()
            await stream.aclose()
            assert result.reason is StopReason.ERROR
            assert "no source connected" not in result.detail


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "5", True])
async def test_accept_timeout_s_must_be_a_positive_number(area: Path, bad: object) -> None:
    socket_path = area / "allowed" / "in.sock"
    with pytest.raises(MigrationError, match="accept_timeout_s"):
        async with VirtualMachine.receive(f"unix:{socket_path}",
                                          accept_timeout_s=bad):  # type: ignore[arg-type]
            pass
    assert not socket_path.exists()


async def test_a_unix_destination_is_reached_through_the_vm_path_policy(
        area: Path) -> None:
    """Under a restricted policy the source connects through what the policy opened: a
    symlink in the allowed directory to a listener outside it is refused, and the
    listener outside never sees a connection."""
    outside = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    outside.bind(str(area / "outside" / "other.sock"))
    outside.listen(1)
    outside.setblocking(False)
    link = area / "allowed" / "dest.sock"
    os.symlink(area / "outside" / "other.sock", link)
    kernel = area / "allowed" / "guest.elf"
    shutil.copyfile(TEST_GUEST, kernel)
    policy = PathPolicy([area / "allowed"])
    try:
        with trio.fail_after(TIMEOUT_S):
            async with VirtualMachine(guest_config("avmm.test=echo", kernel=kernel),
                                      paths=policy) as vm:
                with pytest.raises(MigrationError, match="outside"):
                    await vm.migrate(f"unix:{link}")
                assert vm.state is VmState.RUNNING
                vm.stop()
        with pytest.raises(BlockingIOError):
            outside.accept()  # nothing ever connected to it
    finally:
        outside.close()
        policy.close()


async def test_stop_while_a_failed_incoming_vm_releases_its_machine(area: Path) -> None:
    """A stop that lands while a failed incoming VM is releasing the machine it built
    (its vCPUs closed, not yet marked stopped) must not kick the closed vCPUs: nothing
    of that VM ever ran."""
    socket_path = area / "allowed" / "in.sock"
    config = encode(config_to_state(guest_config("", memory_mib=32)))
    with trio.fail_after(TIMEOUT_S):
        async with VirtualMachine.receive(f"unix:{socket_path}") as vm:
            release = vm._resources.close

            def release_then_stop() -> None:
                release()
                vm.stop("stopped while it was released")

            vm._resources.close = release_then_stop  # type: ignore[method-assign]
            stream = await trio.open_unix_socket(str(socket_path))
            channel = Channel(stream)
            await channel.send_header()
            await channel.send(Kind.CONFIG, config)
            kind, _ = await channel.receive()
            assert kind is Kind.READY  # the machine is built, its vCPUs exist
            await stream.aclose()  # the stream is cut: the incoming VM fails
            result = await vm.wait()
            assert result.reason in (StopReason.STOPPED, StopReason.ERROR)
            assert vm.state is VmState.STOPPED
