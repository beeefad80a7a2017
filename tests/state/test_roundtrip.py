"""Snapshot and restore below the VM layer: the test guest, stopped mid-run between two
KVM_RUNs, saved (platform, vCPUs, memory) through the snapshot format and restored in a
new process, ends with exactly the output of a run that was never interrupted."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avmm.state.format import MAGIC
from tests.state.bare_machine import SECTIONS, BareMachine, restore
from tests.state.mem_walk import PREFIX, mem_walk_lines

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
MEM_WALK = "avmm.test=mem-walk avmm.mib=16 avmm.rounds=8"
MEMORY_MIB = 32


def _run_to_end(cmdline: str, vcpus: int = 1) -> str:
    with BareMachine(memory_mib=MEMORY_MIB, cmdline=cmdline, vcpus=vcpus) as machine:
        machine.start()
        assert machine.wait(TIMEOUT_S), machine.serial()
        assert machine.exit_code == 0, (machine.crash, machine.serial())
        return machine.serial()


@pytest.fixture(scope="module")
def uninterrupted() -> str:
    """The whole output of a mem-walk run that nothing stopped."""
    output = _run_to_end(MEM_WALK)
    assert mem_walk_lines(output)[-1] == f"{PREFIX}mem-walk done rounds=8 verify=ok"
    return output


def _wait_for(machine: BareMachine, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while text not in machine.serial():
        assert not machine.finished.is_set(), machine.serial()
        assert time.monotonic() < deadline, machine.serial()
        time.sleep(0.001)


def _snapshot_mid_walk(directory: Path, after_round: int = 2) -> str:
    """Boot mem-walk, stop it inside the round after ``after_round`` (no exit pending:
    the vCPU is kicked out of its ring-3 loop), snapshot; the output so far."""
    with BareMachine(memory_mib=MEMORY_MIB, cmdline=MEM_WALK) as machine:
        machine.start()
        _wait_for(machine, f"mem-walk round={after_round} crc=")
        time.sleep(0.01)
        machine.stop()
        before = machine.serial()
        machine.snapshot(directory)
    assert "done" not in before, "the guest finished before the snapshot: nothing to test"
    return before


def _restore_in_new_process(directory: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.state.bare_machine", "restore", str(directory), *extra],
        capture_output=True, timeout=TIMEOUT_S + 30, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


@pytest.mark.parametrize("memory", ["mapped", "copied"])
def test_mem_walk_goes_on_in_a_new_process_from_a_mid_walk_snapshot(
        tmp_path: Path, uninterrupted: str, memory: str) -> None:
    before = _snapshot_mid_walk(tmp_path / "snap")
    restored = _restore_in_new_process(tmp_path / "snap",
                                       *(["--copy"] if memory == "copied" else []))
    assert restored.returncode == 0, restored.stderr.decode()
    after = restored.stdout.decode()
    # No round starts over, none is skipped: the two halves are the whole run, and the
    # restored half has walked (round 3 here, or a later one on a loaded host).
    assert before + after == uninterrupted
    assert f"{PREFIX}mem-walk round=" in after


def test_snapshot_restore_snapshot_restore(tmp_path: Path, uninterrupted: str) -> None:
    """A restored guest snapshotted again (its RAM now a private mapping of the first
    memory file) and restored again still ends like the uninterrupted run."""
    first = _snapshot_mid_walk(tmp_path / "one", after_round=1)
    with restore(tmp_path / "one") as machine:
        machine.start()
        done_rounds = len(mem_walk_lines(first))
        _wait_for(machine, f"mem-walk round={done_rounds + 2} crc=")
        time.sleep(0.01)
        machine.stop()
        second = machine.serial()
        assert "done" not in second
        machine.snapshot(tmp_path / "two")
        # The first snapshot's memory file is untouched by what the guest wrote since.
    restored = _restore_in_new_process(tmp_path / "two")
    assert restored.returncode == 0, restored.stderr.decode()
    assert first + second + restored.stdout.decode() == uninterrupted

    again = _restore_in_new_process(tmp_path / "one")  # the first one, a second time
    assert again.returncode == 0, again.stderr.decode()
    assert first + again.stdout.decode() == uninterrupted


@pytest.mark.parametrize("delay_ms", [1, 3, 6, 10, 15, 25])
def test_two_vcpus_go_on_from_wherever_they_were(tmp_path: Path, delay_ms: int,
                                                 figure) -> None:
    """The smp scenario (the boot CPU starts the other with INIT, SIPI, SIPI; each
    reports in) stopped at several moments: before the INIT, between INIT and SIPI,
    after both halted. Each restored pair ends like a run that was never stopped."""
    reference = _run_to_end("avmm.test=smp", vcpus=2)
    assert reference.endswith(f"{PREFIX}smp cpus=2 reported=2 apic_ids=0,1\n")
    with BareMachine(memory_mib=MEMORY_MIB, cmdline="avmm.test=smp", vcpus=2) as machine:
        machine.start()
        time.sleep(delay_ms / 1000)
        machine.stop()
        before = machine.serial()
        info = machine.snapshot(tmp_path / "snap")
    restored = _restore_in_new_process(tmp_path / "snap")
    assert restored.returncode == 0, restored.stderr.decode()
    assert before + restored.stdout.decode() == reference
    from avmm.state import read_snapshot

    state = read_snapshot(info.path, SECTIONS).sections["machine"]
    figure(f"smp snapshot after {delay_ms} ms: vCPU MP states",
           ",".join(str(v.mp_state) for v in state.vcpus))


def test_a_second_vcpu_waiting_for_its_sipi_stays_waiting(tmp_path: Path) -> None:
    reference = _run_to_end(MEM_WALK, vcpus=2)
    with BareMachine(memory_mib=MEMORY_MIB, cmdline=MEM_WALK, vcpus=2) as machine:
        machine.start()
        _wait_for(machine, "mem-walk round=2 crc=")
        machine.stop()
        before = machine.serial()
        machine.snapshot(tmp_path / "snap")
    restored = _restore_in_new_process(tmp_path / "snap")
    assert restored.returncode == 0, restored.stderr.decode()
    assert before + restored.stdout.decode() == reference


@pytest.fixture(scope="module")
def good_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("good") / "snap"
    _snapshot_mid_walk(directory)
    return directory


def _damaged(good: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "snap"
    subprocess.run(["cp", "-a", "--sparse=always", str(good), str(copy)], check=True)
    return copy


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x04]))


def _first_data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        return os.lseek(f.fileno(), 0, os.SEEK_DATA) + 100


@pytest.mark.parametrize(("damage", "complaint"), [
    ("truncate-state", "truncated or corrupt"),
    ("truncate-state-header", "truncated in its header"),
    ("flip-state", "corrupt (its SHA-256 does not match its contents)"),
    ("version", "written in state file format 5"),
    ("no-memory", "the snapshot's memory file is missing"),
    ("truncate-memory", "(truncated or replaced?)"),
    ("flip-memory", "the memory file is corrupt"),
    ("flip-memory-copied", "the memory file is corrupt"),
])
def test_a_damaged_snapshot_is_one_line_from_the_restoring_process(
        good_snapshot: Path, tmp_path: Path, damage: str, complaint: str) -> None:
    snapshot = _damaged(good_snapshot, tmp_path)
    state, memory = snapshot / "state.avmm", snapshot / "memory.avmm"
    if damage == "truncate-state":
        os.truncate(state, state.stat().st_size // 2)
    elif damage == "truncate-state-header":
        os.truncate(state, 12)
    elif damage == "flip-state":
        _flip(state, state.stat().st_size // 3)
    elif damage == "version":
        _flip(state, len(MAGIC))  # the format version's low byte: 1 ^ 4 = 5
    elif damage == "no-memory":
        memory.unlink()
    elif damage == "truncate-memory":
        os.truncate(memory, memory.stat().st_size - 4096)
    elif damage.startswith("flip-memory"):
        _flip(memory, _first_data_offset(memory))
    # A mapped memory file is read lazily, so its digest is checked only on request;
    # a copied one always.
    restored = _restore_in_new_process(
        snapshot, *{"flip-memory": ["--verify"], "flip-memory-copied": ["--copy"]}.get(damage, []))
    stderr = restored.stderr.decode()
    assert restored.returncode == 2, (restored.returncode, stderr)
    assert stderr.count("\n") == 1 and stderr.startswith("avmm: cannot restore: "), stderr
    assert complaint in stderr, stderr
    assert restored.stdout == b""  # the guest never ran
