"""Live migration between two ``avmm serve`` processes, driven the way a person does it:
``avmm receive`` on the destination, ``avmm migrate`` on the source (README, "The
daemon", "CLI client"). The test guest's ``mem-walk`` rewrites its memory all the time;
it goes A → B over a unix socket and back B → A over TCP on localhost, goes on from the
round it was in each time, and ends ``verify=ok``; each source VM ends ``migrated``."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from avmm.api import ApiClient
from tests.state.mem_walk import PREFIX, expected_lines, mem_walk_lines

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

REPO = Path(__file__).resolve().parent.parent
AVMM = [sys.executable, "-m", "avmm.cli"]
GUEST = REPO / "build" / "guest" / "testguest.elf"
MIB = 16
#: Enough rounds (about 40 ms each here) that the guest still walks after two
#: migrations, each begun by a new avmm process.
ROUNDS = 1000
CHECKED_ROUNDS = 6
TIMEOUT_S = 300


class Daemon:
    def __init__(self, directory: Path, name: str) -> None:
        self.socket = directory / f"{name}.sock"
        self.log_path = directory / f"{name}.log"
        self._log = self.log_path.open("wb")
        # Dense mode, pinned (process is root's default): tests/isolation has process
        # mode's migrations (tests/isolation/test_process_receive.py: the same mem-walk
        # between two daemons in process mode, the destination given no config).
        # Filters in kill mode (the default, said here): the TCP leg's sockets come
        # from the IP-socket thread.
        self.process = subprocess.Popen([*AVMM, "serve", "--socket", str(self.socket),
                                         "--isolation", "none", "--seccomp", "kill"],
                                        stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=self._log, cwd=REPO)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            assert self.process.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "avmm serve did not start"
            time.sleep(0.05)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    async def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(TIMEOUT_S):
            return await trio.run_process(
                [*AVMM, *args], capture_stdout=True, capture_stderr=True, check=False,
                stdin=subprocess.DEVNULL, cwd=REPO,
                env={**os.environ, "AVMM_SOCKET": str(self.socket)})


@pytest.fixture
def area() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="avmm-mig-e2e-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemons(area: Path) -> Iterator[tuple[Daemon, Daemon]]:
    first = Daemon(area, "a")
    try:
        second = Daemon(area, "b")
        try:
            yield first, second
        finally:
            second.close()
    finally:
        first.close()


@pytest.fixture
async def clients(daemons: tuple[Daemon, Daemon]) -> AsyncIterator[tuple[ApiClient,
                                                                          ApiClient]]:
    async with ApiClient(daemons[0].socket) as a, ApiClient(daemons[1].socket) as b:
        yield a, b


async def follow(api: ApiClient, vm_id: str, output: bytearray) -> None:
    """The VM's serial output (backlog first) until it stops."""
    async with api.console(vm_id) as chunks:
        async for chunk in chunks:
            output += chunk


async def wait_for(output: bytearray, text: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        while text.encode() not in output:
            await trio.sleep(0.02)


async def wait_stopped(api: ApiClient, vm_id: str) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT_S):
        while (vm := await api.get_vm(vm_id))["state"] != "stopped":
            await trio.sleep(0.1)
    return vm


def check_one_walk(*parts: str) -> None:
    """The outputs of the guest's successive homes make one uninterrupted walk: every
    round once and in order, the first CRCs as the host computes them, verify=ok."""
    lines = mem_walk_lines("".join(parts))
    rounds = [int(line.split("round=")[1].split()[0]) for line in lines
              if " round=" in line]
    assert rounds == list(range(1, ROUNDS + 1)), lines[-5:]
    assert lines[:CHECKED_ROUNDS] == expected_lines(MIB, CHECKED_ROUNDS)[:CHECKED_ROUNDS]
    assert lines[-1] == f"{PREFIX}mem-walk done rounds={ROUNDS} verify=ok"


def check_migrated(source: dict[str, Any]) -> None:
    assert source["state"] == "stopped"
    assert source["exit"]["reason"] == "migrated", source["exit"]
    migration = source["migration"]
    assert migration["state"] == "completed", migration
    assert migration["downtime_ms"] is not None and migration["pages_sent"] > 0


async def test_mem_walk_goes_a_to_b_over_unix_and_back_over_tcp(
        area: Path, daemons: tuple[Daemon, Daemon],
        clients: tuple[ApiClient, ApiClient]) -> None:
    a, b = daemons
    api_a, api_b = clients
    before, middle, after = bytearray(), bytearray(), bytearray()
    async with trio.open_nursery() as nursery:
        # B listens on a unix socket (0600) for the VM.
        received = await b.cli("receive", "--listen", f"unix:{area}/in.sock")
        assert received.returncode == 0, received.stderr.decode()
        on_b = received.stdout.decode().strip()
        assert (await api_b.get_vm(on_b))["state"] == "incoming"
        assert stat.S_IMODE(os.stat(area / "in.sock").st_mode) == 0o600
        nursery.start_soon(follow, api_b, on_b, middle)

        (area / "vm.toml").write_text(
            f'[machine]\nmemory_mib = 32\nacpi = false\n[boot]\nkernel = "{GUEST}"\n'
            f'cmdline = "avmm.test=mem-walk avmm.mib={MIB} avmm.rounds={ROUNDS}"\n'
            '[serial]\nmode = "none"\n')
        started = await a.cli("run", str(area / "vm.toml"))
        assert started.returncode == 0, started.stderr.decode()
        on_a = started.stdout.decode().strip()
        nursery.start_soon(follow, api_a, on_a, before)
        await wait_for(before, "mem-walk round=2 crc=")

        moved = await a.cli("migrate", on_a, "--to", f"unix:{area}/in.sock")
        assert moved.returncode == 0, moved.stderr.decode()
        assert f"{on_a} migrated to unix:{area}/in.sock: downtime " in moved.stdout.decode()
        # Not a terminal: plain progress lines on stderr.
        assert "\r" not in moved.stderr.decode()
        check_migrated(await wait_stopped(api_a, on_a))
        dest = await api_b.get_vm(on_b)
        assert dest["state"] == "running", dest
        assert dest["migration"]["state"] == "completed"
        assert dest["name"] == on_a  # it goes on under the source VM's name
        assert dest["config"]["boot"]["cmdline"].startswith("avmm.test=mem-walk")
        assert not (area / "in.sock").exists()

        # Back to A over TCP, on a port the kernel picks.
        back = await api_a.receive_vm("tcp:127.0.0.1:0")
        address = back["migration"]["address"]
        assert address.startswith("tcp:127.0.0.1:") and not address.endswith(":0")
        nursery.start_soon(follow, api_a, back["id"], after)
        await wait_for(middle, "mem-walk round=")  # it walks on B
        moved = await b.cli("migrate", on_b, "--to", address, "--downtime-ms", "500")
        assert moved.returncode == 0, moved.stderr.decode()
        check_migrated(await wait_stopped(api_b, on_b))
        end = await wait_stopped(api_a, back["id"])
        # The guest's own end (debug-exit 0 after verify=ok), not a failure.
        assert end["exit"]["exit_status"] in (0, 1), end["exit"]
        assert end["migration"]["state"] == "completed"
        metrics = await api_a.metrics()
        nursery.cancel_scope.cancel()
    assert "done" not in before.decode() + middle.decode()
    check_one_walk(before.decode(), middle.decode(), after.decode())
    assert f'avmm_migration_state{{vm="{on_a}",state="completed"}} 1' in metrics
    assert f'avmm_migration_state{{vm="{back["id"]}",state="completed"}} 1' in metrics
