"""``avmm serve`` as a real process, and the CLI client commands against it."""

from __future__ import annotations

import contextlib
import os
import re
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

#: ``avmm`` that also appends "<call> <file>" to $AVMM_TEST_FLUSH_LOG after every
#: os.fdatasync / os.fsync it makes: a flush is proven by the call, not by the file's
#: contents, which the page cache would show either way.
_FLUSH_RECORDING_AVMM = [sys.executable, "-c", """
import os, sys

def recording(name, real):
    def call(fd):
        real(fd)
        with open(os.environ["AVMM_TEST_FLUSH_LOG"], "a") as log:
            log.write(f"{name} {os.readlink(f'/proc/self/fd/{fd}')}\\n")
    return call

for name in ("fdatasync", "fsync"):
    setattr(os, name, recording(name, getattr(os, name)))
from avmm.cli import main
sys.exit(main())
"""]


class Daemon:
    def __init__(self, process: trio.Process, socket: Path, stderr: Path) -> None:
        self.process = process
        self.socket = socket
        self.stderr = stderr


@pytest.fixture
async def daemon(socket_dir: Path) -> AsyncIterator[Daemon]:
    async with running_daemon(socket_dir) as started:
        yield started


@contextlib.asynccontextmanager
async def running_daemon(socket_dir: Path, command: Sequence[str] = tuple(_AVMM),
                         env: dict[str, str] | None = None,
                         serve_args: Sequence[str] = (),
                         isolation: str | None = "none") -> AsyncIterator[Daemon]:
    """``avmm serve`` on ``socket_dir/avmm.sock``, logging to ``socket_dir/serve.log``.

    ``isolation``: its --isolation; None gives none, so the daemon picks its default
    (process as root). The tests here mean dense mode (``none``): their subject is the
    API and the CLI, some look into the daemon's own process (the flush-recording avmm
    patches the daemon's os.fsync), and process mode has files of its own
    (tests/isolation/test_process_*.py)."""
    socket = socket_dir / "avmm.sock"
    stderr = socket_dir / "serve.log"
    with stderr.open("wb") as log:
        process = await trio.lowlevel.open_process(
            [*command, "--log-level", "info", "serve", "--socket", str(socket),
             *([] if isolation is None else ["--isolation", isolation]), *serve_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env={**os.environ, **(env or {})})
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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_stops_every_vm_and_removes_the_socket(daemon: Daemon,
                                                              signum: signal.Signals) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    config = {"machine": {"memory_mib": 32, "acpi": False},
              "boot": {"kernel": str(TEST_GUEST),
                       "cmdline": "avmm.test=count avmm.n=100000000000000"}}
    async with ApiClient(daemon.socket) as api:
        ids = [(await api.create_vm(config))["id"] for _ in range(2)]
        output = bytearray()
        async with api.console(ids[0]) as chunks:
            daemon.process.send_signal(signum)
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
    assert f"signal={signum.name}" in log
    assert "vms=2" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log


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
    assert header.split() == ["ID", "NAME", "STATE", "PID", "UPTIME", "EXIT"]
    assert row.split()[:3] == [vm_id, "echoer", "running"]
    # isolation none: the daemon's own process runs the VM.
    assert row.split()[3] == str(daemon.process.pid)

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


async def test_sigterm_flushes_the_disks_of_running_vms(socket_dir: Path) -> None:
    """A guest that keeps writing and never sends FLUSH (blk-bench): its data reaches
    the disk only through the daemon's own fdatasync at SIGTERM, which the recording
    daemon logs (the page cache would show the data either way)."""
    flush_log = socket_dir / "flushes.log"
    image = socket_dir / "disk.img"
    image.write_bytes(bytes(1 << 20))
    config = {"machine": {"memory_mib": 32, "acpi": False},
              "boot": {"kernel": str(TEST_GUEST),
                       "cmdline": "avmm.test=blk-bench avmm.rw=write avmm.n=1000000000"},
              "disk": [{"path": str(image)}]}
    async with running_daemon(socket_dir, _FLUSH_RECORDING_AVMM,
                              env={"AVMM_TEST_FLUSH_LOG": str(flush_log)}) as daemon:
        async with ApiClient(daemon.socket) as api:
            vm_id = (await api.create_vm(config))["id"]
            with trio.fail_after(60):  # the guest has written something
                while image.read_bytes() == bytes(1 << 20):
                    assert (await api.get_vm(vm_id))["state"] == "running"
                    await trio.sleep(0.05)
        # Nobody flushed the disk so far.
        assert not flush_log.exists() or str(image) not in flush_log.read_text()
        daemon.process.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            status = await daemon.process.wait()
        assert status == 0, daemon.stderr.read_text()
    image_flushes = [line.split()[0] for line in flush_log.read_text().splitlines()
                     if line.endswith(f" {image}")]
    assert image_flushes in (["fdatasync"], ["fsync"])


def ps_table(text: str) -> list[dict[str, str]]:
    """``avmm ps`` output as rows of {column: cell}, cut at the header's column starts
    (cells are left-aligned under their heading)."""
    header, *rows = text.splitlines()
    names = header.split()
    starts = [header.index(name) for name in names]
    ends = [*starts[1:], None]
    return [{name: row[start:end].strip() for name, start, end in zip(names, starts, ends,
                                                                        strict=True)}
            for row in rows]


def seconds_of(duration: str) -> int:
    """The inverse of ``avmm ps``'s UPTIME format: 42s, 3m07s, 2h05m."""
    if match := re.fullmatch(r"(\d+)s", duration):
        return int(match[1])
    if match := re.fullmatch(r"(\d+)m(\d\d)s", duration):
        return int(match[1]) * 60 + int(match[2])
    match = re.fullmatch(r"(\d+)h(\d\d)m", duration)
    assert match, f"not an uptime: {duration!r}"
    return int(match[1]) * 3600 + int(match[2]) * 60


async def test_ps_columns_say_what_the_api_says(daemon: Daemon) -> None:
    def config(name: str, scenario: str) -> dict[str, object]:
        return {"name": name, "machine": {"memory_mib": 32, "acpi": False},
                "boot": {"kernel": str(TEST_GUEST), "cmdline": f"avmm.test={scenario}"}}

    async with ApiClient(daemon.socket) as api:
        running = (await api.create_vm(config("spinner", "count avmm.n=100000000000000")))["id"]
        done = (await api.create_vm(config("greeter", "hello")))["id"]
        waiting = (await api.create_vm(config("sleeper", "hello"), start=False))["id"]
        with trio.fail_after(60):
            while (await api.get_vm(done))["state"] != "stopped":
                await trio.sleep(0.05)
        before = {vm["id"]: vm for vm in await api.list_vms()}
        result = await avmm("ps", socket=daemon.socket)
        after = {vm["id"]: vm for vm in await api.list_vms()}
    assert result.returncode == 0, result.stderr
    header = result.stdout.decode().splitlines()[0]
    assert header.split() == ["ID", "NAME", "STATE", "PID", "UPTIME", "EXIT"]
    rows = ps_table(result.stdout.decode())
    assert [row["ID"] for row in rows] == list(before)  # creation order
    for row in rows:
        vm = before[row["ID"]]
        assert row["NAME"] == vm["name"]
        assert row["STATE"] == vm["state"]
        assert row["PID"] == str(vm["pid"])
        if vm["uptime_s"] is None:
            assert row["UPTIME"] == "-"
        else:
            assert (int(vm["uptime_s"]) <= seconds_of(row["UPTIME"])
                    <= int(after[row["ID"]]["uptime_s"]))
        if vm["exit"] is None:
            assert row["EXIT"] == "-"
        else:
            exit_ = vm["exit"]
            assert row["EXIT"] == (f"{exit_['reason']} (status {exit_['exit_status']}): "
                                   f"{exit_['detail']}")
    by_id = {row["ID"]: row for row in rows}
    assert by_id[running]["STATE"] == "running" and by_id[running]["EXIT"] == "-"
    assert by_id[done]["EXIT"].startswith("reset (status 0)")
    assert by_id[waiting]["STATE"] == "paused" and by_id[waiting]["EXIT"] == "-"


async def test_pause_resume_stop_and_rm_take_several_ids(daemon: Daemon) -> None:
    config = {"machine": {"memory_mib": 32, "acpi": False},
              "boot": {"kernel": str(TEST_GUEST),
                       "cmdline": "avmm.test=count avmm.n=100000000000000"}}
    socket = daemon.socket
    async with ApiClient(socket) as api:
        ids = [(await api.create_vm(config))["id"] for _ in range(3)]
        first, second, bystander = ids

        async def states() -> list[str]:
            return [(await api.get_vm(vm_id))["state"] for vm_id in ids]

        assert (await avmm("pause", first, second, socket=socket)).returncode == 0
        assert await states() == ["paused", "paused", "running"]
        assert (await avmm("resume", first, second, socket=socket)).returncode == 0
        assert await states() == ["running", "running", "running"]

        # An unknown id in the middle: the others are still acted on, the status is 1
        # and the message names the bad id.
        result = await avmm("pause", first, "vm-nope", second, socket=socket)
        assert result.returncode == 1
        assert b"vm-nope" in result.stderr
        assert await states() == ["paused", "paused", "running"]

        result = await avmm("stop", first, second, socket=socket)
        assert result.returncode == 0, result.stderr
        assert await states() == ["stopped", "stopped", "running"]
        lines = result.stdout.decode().splitlines()
        assert [line.split(":")[0] for line in lines] == [first, second]
        assert all("stopped (status 0)" in line for line in lines)

        for _ in range(2):  # rm of several ids is idempotent too
            assert (await avmm("rm", first, second, socket=socket)).returncode == 0
            assert [vm["id"] for vm in await api.list_vms()] == [bystander]
        assert (await api.get_vm(bystander))["state"] == "running"
