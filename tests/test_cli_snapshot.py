"""``avmm snapshot VM-ID DIR [--resume]`` through a real ``avmm serve`` process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
AVMM = [sys.executable, "-m", "avmm.cli"]
GUEST = REPO / "build" / "guest" / "testguest.elf"

class Cli:
    """Runs avmm commands against one daemon, in ``cwd``."""

    def __init__(self, socket_path: Path, cwd: Path) -> None:
        self.socket_path = socket_path
        self.cwd = cwd

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "AVMM_SOCKET": str(self.socket_path)}
        return subprocess.run([*AVMM, *args], capture_output=True, text=True, env=env,
                              timeout=timeout, stdin=subprocess.DEVNULL, cwd=self.cwd)

    def state(self, vm_id: str) -> str:
        result = self("ps", "--json")
        assert result.returncode == 0, result.stderr
        states = {vm["id"]: vm["state"] for vm in json.loads(result.stdout)}
        return states[vm_id]

    def run(self, cmdline: str, memory_mib: int = 32) -> str:
        config = self.cwd / "vm.toml"
        config.write_text(f'[machine]\nmemory_mib = {memory_mib}\nacpi = false\n'
                          f'[boot]\nkernel = "{GUEST}"\ncmdline = "{cmdline}"\n'
                          '[serial]\nmode = "none"\n')
        result = self("run", str(config))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("avmm: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def cli() -> Iterator[Cli]:
    directory = Path(tempfile.mkdtemp(prefix="avmm-cli-snap-", dir="/tmp"))
    socket_path = directory / "avmm.sock"
    log = (directory / "serve.log").open("wb")
    # The daemon's default mode (process, as root), its jails in the test's directory.
    daemon = subprocess.Popen([*AVMM, "serve", "--socket", str(socket_path),
                               "--jail-root", str(directory / "jail")],
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not socket_path.exists():
            assert daemon.poll() is None, (directory / "serve.log").read_text()
            assert time.monotonic() < deadline, "avmm serve did not start"
            time.sleep(0.05)
        yield Cli(socket_path, directory)
    finally:
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.kvm
@pytest.mark.guest
def test_snapshot_refusals_are_one_line_and_exit_1(cli: Cli) -> None:
    unknown = cli("snapshot", "vm-nope", "snap")
    assert unknown.returncode == 1
    assert "vm-nope" in one_line(unknown)
    # The echo guest waits for input: it runs without burning CPU.
    vm_id = cli.run("avmm.test=echo")
    assert cli.state(vm_id) == "running"
    (cli.cwd / "exists").mkdir()
    refused = cli("snapshot", vm_id, "exists")
    assert refused.returncode == 1
    # The relative DIR reached the daemon as an absolute path.
    assert f"{cli.cwd / 'exists'} already exists" in one_line(refused)
    # The VM was running: a failed snapshot does not leave it paused.
    assert cli.state(vm_id) == "running"
    relative_parent = cli("snapshot", vm_id, "missing/snap")
    assert relative_parent.returncode == 1
    assert str(cli.cwd / "missing") in one_line(relative_parent)
    assert cli.state(vm_id) == "running"
    assert cli("rm", vm_id).returncode == 0


def test_snapshot_without_a_daemon_is_one_line_and_exit_1(tmp_path: Path) -> None:
    env = {**os.environ, "AVMM_SOCKET": str(tmp_path / "none.sock")}
    result = subprocess.run([*AVMM, "snapshot", "vm-1", "snap"], capture_output=True,
                            text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "avmm serve" in one_line(result)


def test_snapshot_usage_is_exit_2() -> None:
    result = subprocess.run([*AVMM, "snapshot", "vm-1"], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "DIR" in result.stderr


#: Enough rounds (about 10 ms each) that the pause, which starts a new avmm process,
#: lands long before the end.
MEM_WALK_ROUNDS = 400
PREFIX = "avmm-testguest: mem-walk "


def rounds_printed(output: str) -> list[int]:
    return [int(line.split("round=")[1].split()[0]) for line in output.splitlines()
            if line.startswith(PREFIX + "round=") and " crc=" in line]


@pytest.mark.kvm
@pytest.mark.guest
def test_avmm_snapshot_then_avmm_up_restore(cli: Cli) -> None:
    serial = cli.cwd / "serial.log"
    config = cli.cwd / "walk.toml"
    config.write_text(
        f'[machine]\nmemory_mib = 32\nacpi = false\n[boot]\nkernel = "{GUEST}"\n'
        f'cmdline = "avmm.test=mem-walk avmm.mib=4 avmm.rounds={MEM_WALK_ROUNDS}"\n'
        f'[serial]\nmode = "file"\npath = "{serial}"\n')
    run = cli("run", str(config))
    assert run.returncode == 0, run.stderr
    vm_id = run.stdout.strip()
    deadline = time.monotonic() + 120
    while PREFIX + "round=2 crc=" not in serial.read_text():
        assert time.monotonic() < deadline, serial.read_text()
        time.sleep(0.01)
    # A running VM: avmm snapshot pauses it, and leaves it paused.
    taken = cli("snapshot", vm_id, "snap")
    assert taken.returncode == 0, taken.stderr
    assert taken.stdout.startswith(f"{cli.cwd / 'snap'}: state ")
    assert "left paused" in taken.stdout
    assert cli.state(vm_id) == "paused"
    assert (cli.cwd / "snap" / "state.avmm").is_file()
    saved = serial.read_text()  # what the guest printed up to "snap"
    assert PREFIX + "done" not in saved, "the walk ended before the pause"
    # Paused already, with --resume: a second snapshot, and the VM goes on.
    resumed = cli("snapshot", vm_id, str(cli.cwd / "snap2"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    assert cli.state(vm_id) in ("running", "stopping", "stopped")
    assert cli("rm", vm_id).returncode == 0

    # The restored VM writes its serial output to the same file (truncated first).
    restored = cli("up", "--restore", "snap", timeout=300)
    assert restored.returncode == 0, restored.stderr
    after = serial.read_text()
    assert PREFIX + "round=1 " not in after, "the restored guest started over"
    # It goes on from the saved round, even mid-line: the two halves are one run, with
    # no round repeated and none skipped.
    assert rounds_printed(saved + after) == list(range(1, MEM_WALK_ROUNDS + 1))
    assert f"{PREFIX}done rounds={MEM_WALK_ROUNDS} verify=ok" in after
