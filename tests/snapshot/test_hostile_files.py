"""A snapshot directory is the API client's, not ours: whatever it holds (symlinks, a
FIFO, a huge state file) and whatever the client does to it while we read or write it,
the daemon reads and writes only regular files inside that directory, never blocks on
one, and never lets one make it allocate without bound. These tests need no KVM: they
use the state package directly with a guest memory that no VM runs on."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from avmm import VirtualMachine
from avmm.errors import StateError
from avmm.memory import MIB, GuestMemory
from avmm.paths import PathPolicy
from avmm.state import SnapshotError, load_memory, read_snapshot, write_snapshot
from avmm.state.snapshot import MEMORY_FILE_NAME, STATE_FILE_NAME
from tests.vm.helpers import REPO

SECRET = b"TOP-SECRET-OF-ANOTHER-TENANT"


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory(4 * MIB, name="avmm-hostile-test")
    region = ram.regions[0]
    ram.view(region.guest_address + 0x2000, 8)[:] = b"OUR-DATA"
    yield ram
    ram.close()


@pytest.fixture
def snapshot_dir(tmp_path: Path, memory: GuestMemory) -> Path:
    """A whole snapshot (no sections besides the memory) in ``tmp_path/allowed``."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    write_snapshot(allowed / "snap", {}, memory)
    return allowed / "snap"


def victim_of_size(tmp_path: Path, size: int) -> Path:
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    victim = secret / "victim.img"
    with open(victim, "wb") as file:
        file.truncate(size)
        file.seek(0x2000)
        file.write(SECRET)
    return victim


# -- finding 1: files in the snapshot are opened without following symlinks -------------


def test_a_memory_file_that_is_a_symlink_is_refused(tmp_path: Path, snapshot_dir: Path,
                                                   memory: GuestMemory) -> None:
    victim = victim_of_size(tmp_path, memory.size)
    os.unlink(snapshot_dir / MEMORY_FILE_NAME)
    os.symlink(victim, snapshot_dir / MEMORY_FILE_NAME)
    with pytest.raises(SnapshotError, match=MEMORY_FILE_NAME) as caught:
        snap = read_snapshot(snapshot_dir, {})
        # (Before the fix the symlink was followed: the victim's bytes became guest RAM.)
        ram = GuestMemory(memory.size, name="avmm-hostile-test")
        try:
            load_memory(snap, ram, copy=True, verify=False)
            assert SECRET not in bytes(ram.view(ram.regions[0].guest_address, 0x3000))
        finally:
            ram.close()
    assert "\n" not in str(caught.value)


def test_a_state_file_that_is_a_symlink_is_refused(tmp_path: Path,
                                                  snapshot_dir: Path) -> None:
    real = tmp_path / "state-elsewhere"
    os.rename(snapshot_dir / STATE_FILE_NAME, real)
    os.symlink(real, snapshot_dir / STATE_FILE_NAME)
    with pytest.raises(SnapshotError, match=STATE_FILE_NAME):
        read_snapshot(snapshot_dir, {})


def test_the_memory_file_is_opened_once_when_the_snapshot_is_read(
        tmp_path: Path, snapshot_dir: Path, memory: GuestMemory) -> None:
    """Swapping memory.avmm after the snapshot was read changes nothing: the file that
    was checked is the one loaded."""
    snap = read_snapshot(snapshot_dir, {})
    try:
        victim = victim_of_size(tmp_path, memory.size)
        os.unlink(snapshot_dir / MEMORY_FILE_NAME)
        os.symlink(victim, snapshot_dir / MEMORY_FILE_NAME)
        ram = GuestMemory(memory.size, name="avmm-hostile-test")
        try:
            load_memory(snap, ram, copy=True)  # verifies the digest
            view = bytes(ram.view(ram.regions[0].guest_address, 0x3000))
            assert SECRET not in view
            assert b"OUR-DATA" in view
        finally:
            ram.close()
    finally:
        close = getattr(snap, "close", None)
        if close is not None:
            close()


def test_snapshot_files_that_are_not_regular_files_are_refused(snapshot_dir: Path) -> None:
    os.unlink(snapshot_dir / MEMORY_FILE_NAME)
    os.mkdir(snapshot_dir / MEMORY_FILE_NAME)
    with pytest.raises(SnapshotError, match="not a regular file"):
        read_snapshot(snapshot_dir, {})


# -- finding 5 (and 8): a FIFO as state.avmm is refused at once --------------------------


async def test_a_fifo_as_state_file_is_refused_quickly(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "snap").mkdir(parents=True)
    fifo = allowed / "snap" / STATE_FILE_NAME
    os.mkfifo(fifo)
    policy = PathPolicy([allowed])
    caught: list[BaseException] = []

    async def restore() -> None:
        try:
            with trio.fail_after(10):
                async with VirtualMachine.restore(allowed / "snap", start_paused=True,
                                                  paths=policy):
                    pass
        except BaseException as e:
            caught.append(e)

    async def unblock() -> None:
        # Without the fix the worker thread blocks in open() and cannot be cancelled:
        # open the writer side late so that the test ends (and fails) anyway.
        await trio.sleep(20)
        fd = await trio.to_thread.run_sync(os.open, fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(unblock)
            await restore()
            nursery.cancel_scope.cancel()
    finally:
        policy.close()
    assert caught and isinstance(caught[0], StateError), caught
    assert STATE_FILE_NAME in str(caught[0]) and "regular file" in str(caught[0])


# -- finding 3: the .partial directory swapped for a symlink while it is written ---------


class _SlowMemory:
    """A GuestMemory whose first read waits until ``ready`` is set: the moment between
    the creation of the .partial directory and the writes into it."""

    def __init__(self, ram: GuestMemory, ready: threading.Event) -> None:
        self._ram = ram
        self._ready = ready
        self.size, self.fd, self.host_base = ram.size, ram.fd, ram.host_base
        self.regions = ram.regions

    def view(self, address: int, length: int) -> memoryview:
        self._ready.wait(10)
        return self._ram.view(address, length)


def test_a_partial_directory_swapped_for_a_symlink_gets_nothing_written_outside(
        tmp_path: Path, memory: GuestMemory) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    swapped = threading.Event()

    def attacker() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for name in os.listdir(allowed):
                if ".partial-" in name:
                    os.rename(allowed / name, allowed / "moved-away")
                    os.symlink(outside, allowed / name)
                    swapped.set()
                    return
        swapped.set()

    thread = threading.Thread(target=attacker)
    thread.start()
    try:
        with pytest.raises(SnapshotError, match="replaced"):
            write_snapshot(allowed / "snap", {}, _SlowMemory(memory, swapped))  # type: ignore[arg-type]
    finally:
        thread.join()
    assert os.listdir(outside) == []
    assert not (allowed / "snap").is_symlink()


def test_write_snapshot_creates_nothing_through_a_symlinked_name(
        tmp_path: Path, memory: GuestMemory) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    os.symlink(outside, allowed / "snap")
    with pytest.raises(SnapshotError, match="already exists"):
        write_snapshot(allowed / "snap", {}, memory)
    assert os.listdir(outside) == []


def test_a_snapshot_written_through_its_parent_fd_reads_back(tmp_path: Path,
                                                            memory: GuestMemory) -> None:
    info = write_snapshot(tmp_path / "snap", {}, memory)
    assert info.path == tmp_path / "snap"
    assert sorted(os.listdir(tmp_path)) == ["snap"]  # no .partial left
    assert os.stat(tmp_path / "snap").st_mode & 0o777 == 0o700
    snap = read_snapshot(tmp_path / "snap", {})
    try:
        ram = GuestMemory(memory.size, name="avmm-hostile-test")
        try:
            load_memory(snap, ram, copy=True)
            assert bytes(ram.view(ram.regions[0].guest_address + 0x2000, 8)) == b"OUR-DATA"
        finally:
            ram.close()
    finally:
        snap.close()


# -- finding 6: a big but valid state file is refused before it is parsed ---------------

_AMPLIFY = r"""
import hashlib, resource, sys
from avmm.state.format import HEADER, FORMAT_VERSION, parse_state
from avmm.state._errors import SnapshotError
from avmm.state import MachineState

def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F; v >>= 7
        out.append(b | 0x80 if v else b)
        if not v:
            return bytes(out)

def state(payload):
    head = HEADER.build({"format_version": FORMAT_VERSION, "writer": "avmm test",
                         "payload_length": len(payload)})
    data = head + payload
    return data + hashlib.sha256(data).digest()

n = (12 << 20) // 4
text = lambda s: varint(len(s)) + s.encode()
cases = {
    # a list of n empty records in an expected section
    "list": varint(1) + text("machine") + bytes([6]) + varint(n) + bytes([7, 0, 0, 0]) * n,
    # the same under a section nobody asked for
    "unknown-section": varint(1) + text("bogus") + bytes([6]) + varint(n)
                       + bytes([7, 0, 0, 0]) * n,
    # lists of lists: no list too long, many values in all
    "nested": varint(1) + text("machine") + bytes([6]) + varint(n // 256)
              + (bytes([6]) + varint(256) + bytes([7, 0, 0, 0]) * 256) * (n // 256),
    # a map of n / 4 small keys to empty records
    "map": varint(1) + text("machine") + bytes([8]) + varint(n // 4)
           + b"".join(bytes([3]) + varint(2 * i) + bytes([7, 0, 0, 0]) for i in range(n // 4)),
}
name = sys.argv[1]
data = state(cases[name])
del cases
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    parse_state(data, {"machine": MachineState})
    print(name, "ACCEPTED")
except SnapshotError as e:
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) >> 10
    print(name, "refused", grown, "MiB:", str(e)[:100])
"""


@pytest.mark.parametrize("case", ["list", "unknown-section", "nested", "map"])
def test_a_big_valid_state_file_is_refused_without_growing_memory(case: str) -> None:
    """Each crafted file is ~12 MiB with a valid SHA-256; parsing it whole took ~50
    times that. A long list or map is refused on its count, an unknown section on its
    name, many short lists when the values run out (avmm.state._reader.MAX_VALUES: some
    100 MiB of Python objects at most). Measured in a new process (ru_maxrss is a
    peak)."""
    result = subprocess.run([sys.executable, "-c", _AMPLIFY, case], capture_output=True,
                            text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    name, verdict, grown, *_ = result.stdout.split()
    assert (name, verdict) == (case, "refused"), result.stdout
    assert int(grown) < (160 if case == "nested" else 64), result.stdout


def test_a_state_file_over_the_size_cap_is_refused_before_it_is_read(
        snapshot_dir: Path) -> None:
    path = snapshot_dir / STATE_FILE_NAME
    with open(path, "r+b") as file:
        file.truncate(65 << 20)  # sparse: nothing of it is ever read
    with pytest.raises(SnapshotError, match="too large"):
        read_snapshot(snapshot_dir, {})
