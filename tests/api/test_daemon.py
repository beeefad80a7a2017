"""``avmm serve`` as a real process, and the CLI client commands against it."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import trio

from avmm.api import ApiClient
from tests.vm.helpers import TEST_GUEST

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

_AVMM = [sys.executable, "-c", "import sys; from avmm.cli import main; sys.exit(main())"]


class Daemon:
    def __init__(self, process: trio.Process, socket: Path, stderr: Path) -> None:
        self.process = process
        self.socket = socket
        self.stderr = stderr


@pytest.fixture
async def daemon(socket_dir: Path) -> AsyncIterator[Daemon]:
    socket = socket_dir / "avmm.sock"
    stderr = socket_dir / "serve.log"
    with stderr.open("wb") as log:
        process = await trio.lowlevel.open_process(
            [*_AVMM, "--log-level", "info", "serve", "--socket", str(socket)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        with trio.fail_after(60):
            while not socket.exists():
                assert process.poll() is None, stderr.read_text()
                await trio.sleep(0.05)
        yield Daemon(process, socket, stderr)
    finally:
        if process.poll() is None:
            process.kill()
        await process.wait()


async def avmm(*args: str, socket: Path | None, stdin: bytes = b"",
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    command: Sequence[str] = [*_AVMM, *args]
    if socket is not None:
        command = [*command, "--socket", str(socket)]
    with trio.fail_after(120):
        return await trio.run_process(command, stdin=stdin, capture_stdout=True,
                                      capture_stderr=True, check=False,
                                      env={**os.environ, **(env or {})})


async def test_sigterm_stops_every_vm_and_removes_the_socket(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    config = {"machine": {"memory_mib": 32, "acpi": False},
              "boot": {"kernel": str(TEST_GUEST),
                       "cmdline": "avmm.test=count avmm.n=100000000000000"}}
    async with ApiClient(daemon.socket) as api:
        ids = [(await api.create_vm(config))["id"] for _ in range(2)]
        output = bytearray()
        async with api.console(ids[0]) as chunks:
            daemon.process.send_signal(signal.SIGTERM)
            # The stream ends cleanly (not with a broken connection): the daemon stopped
            # the VM before it stopped serving.
            with trio.fail_after(60):
                async for chunk in chunks:
                    output += chunk
    with trio.fail_after(60):
        status = await daemon.process.wait()
    log = daemon.stderr.read_text()
    assert status == 0, log
    assert not daemon.socket.exists()
    assert "shutting down" in log
    assert "vms=2" in log


async def test_second_daemon_on_a_live_socket_is_refused(daemon: Daemon) -> None:
    result = await avmm("serve", socket=daemon.socket)
    assert result.returncode != 0
    assert b"another server is listening" in result.stderr
    assert daemon.socket.exists()


async def test_cli_client_commands(daemon: Daemon, tmp_path: Path) -> None:
    socket = daemon.socket
    # A relative kernel path: relative to vm.toml, wherever the command runs.
    (tmp_path / "guest.elf").symlink_to(TEST_GUEST)
    vm_toml = tmp_path / "vm.toml"
    vm_toml.write_text('name = "echoer"\n[machine]\nmemory_mib = 32\nacpi = false\n'
                       '[boot]\nkernel = "guest.elf"\ncmdline = "avmm.test=echo"\n')

    result = await avmm("run", str(vm_toml), socket=socket)
    assert result.returncode == 0, result.stderr
    vm_id = result.stdout.decode().strip()
    assert vm_id.startswith("vm-")

    result = await avmm("ps", socket=None, env={"AVMM_SOCKET": str(socket)})
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.decode().splitlines()
    assert header.split() == ["ID", "NAME", "STATE", "UPTIME", "EXIT"]
    assert row.split()[:3] == [vm_id, "echoer", "running"]

    assert (await avmm("pause", vm_id, socket=socket)).returncode == 0
    result = await avmm("pause", vm_id, socket=socket)
    assert result.returncode == 1
    assert b"paused" in result.stderr
    result = await avmm("ps", "--json", socket=socket)
    assert b'"state": "paused"' in result.stdout
    assert (await avmm("resume", vm_id, socket=socket)).returncode == 0

    # stdin is not a terminal here, so no raw mode; the guest quits on "quit" and the
    # console command ends with the VM.
    result = await avmm("console", vm_id, socket=socket, stdin=b"hello cli\nquit\n")
    assert result.returncode == 0, result.stderr
    assert b"avmm-testguest: echo hello cli" in result.stdout
    assert b"avmm-testguest: echo bye" in result.stdout
    assert b"stopped: reset" in result.stderr

    result = await avmm("stop", vm_id, socket=socket)
    assert result.returncode == 0
    assert b"reset (status 0)" in result.stdout
    for _ in range(2):  # rm is idempotent
        assert (await avmm("rm", vm_id, socket=socket)).returncode == 0
    result = await avmm("ps", socket=socket)
    assert vm_id.encode() not in result.stdout

    result = await avmm("pause", "vm-nope", socket=socket)
    assert result.returncode == 1
    assert b"vm-nope" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[boot]\nkernel = "missing.elf"\n')
    result = await avmm("run", str(bad), socket=socket)
    assert result.returncode == 2
    assert b"boot.kernel" in result.stderr


async def test_console_detaches_on_ctrl_a_x(daemon: Daemon) -> None:
    config = {"machine": {"memory_mib": 32, "acpi": False},
              "boot": {"kernel": str(TEST_GUEST), "cmdline": "avmm.test=echo"}}
    async with ApiClient(daemon.socket) as api:
        vm_id = (await api.create_vm(config))["id"]
        result = await avmm("console", vm_id, socket=daemon.socket,
                            stdin=b"before detach\n\x01x")
        assert result.returncode == 0, result.stderr
        assert b"detached" in result.stderr
        vm = await api.get_vm(vm_id)
        assert vm["state"] == "running"
        await api.send_console(vm_id, b"quit\n")
        async with api.console(vm_id) as chunks:
            output = b"".join([chunk async for chunk in chunks])
    assert b"avmm-testguest: echo before detach" in output


async def test_client_without_a_daemon_says_how_to_start_one(socket_dir: Path) -> None:
    result = await avmm("ps", socket=socket_dir / "nothing.sock")
    assert result.returncode == 1
    assert b"avmm serve --socket" in result.stderr
