"""The snapshot writer split in two, as ``avmm serve --isolation process`` uses it: the
directory part (:class:`PartialSnapshot`, the daemon's) and the contents written into
two open files (:func:`write_snapshot_files`, a jailed worker's). What they make reads
back as a snapshot written whole by :func:`write_snapshot`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avmm.memory import MIB, GuestMemory
from avmm.state import (
    MachineState,
    PartialSnapshot,
    SnapshotError,
    load_memory,
    read_snapshot,
    write_snapshot_files,
)
from avmm.state.snapshot import MEMORY_FILE_NAME, STATE_FILE_NAME

from .samples import machine_state


@pytest.fixture
def memory():
    with GuestMemory(8 * MIB) as memory:
        memory.write(3 * MIB, b"guest data")
        yield memory


def test_files_written_through_their_fds_read_back_as_a_sparse_snapshot(
        memory: GuestMemory, tmp_path: Path) -> None:
    target = tmp_path / "snap"
    parent_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with PartialSnapshot.begin(target, parent_fd=parent_fd) as partial:
            files = partial.create_files()
            info = write_snapshot_files(files, {"machine": machine_state()}, memory,
                                        path=target)
            partial.commit()
    finally:
        os.close(parent_fd)
    assert info.path == target and info.bytes_memory == 4096
    assert info.bytes_state == (target / STATE_FILE_NAME).stat().st_size
    assert os.listdir(tmp_path) == ["snap"]
    assert sorted(os.listdir(target)) == [MEMORY_FILE_NAME, STATE_FILE_NAME]
    written = (target / MEMORY_FILE_NAME).stat()
    assert written.st_size == 8 * MIB and written.st_blocks * 512 < MIB  # holes
    with read_snapshot(target, {"machine": MachineState}) as snapshot, \
            GuestMemory(8 * MIB) as restored:
        assert snapshot.sections == {"machine": machine_state()}
        load_memory(snapshot, restored, copy=True)
        assert restored.read(3 * MIB, 10) == b"guest data"


def test_files_that_held_something_become_exactly_the_snapshot(
        memory: GuestMemory, tmp_path: Path) -> None:
    with PartialSnapshot.begin(tmp_path / "snap") as partial:
        files = partial.create_files()
        os.pwrite(files.memory_fd, b"\xff" * (16 * MIB), 0)
        os.pwrite(files.state_fd, b"\xff" * 100_000, 0)
        write_snapshot_files(files, {"machine": machine_state()}, memory,
                             path=tmp_path / "snap")
        partial.commit()
    with read_snapshot(tmp_path / "snap", {"machine": MachineState}) as snapshot, \
            GuestMemory(8 * MIB) as restored:
        load_memory(snapshot, restored, copy=True, verify=True)
        assert restored.read(0, 4) == bytes(4)


def test_a_partial_snapshot_left_without_commit_leaves_nothing(
        memory: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), PartialSnapshot.begin(tmp_path / "snap") as partial:
        files = partial.create_files()
        os.pwrite(files.memory_fd, b"half", 0)
        raise RuntimeError("the worker died")
    assert os.listdir(tmp_path) == []
    (tmp_path / "taken").mkdir()
    with pytest.raises(SnapshotError, match="taken: already exists"):
        PartialSnapshot.begin(tmp_path / "taken")
    assert os.listdir(tmp_path) == ["taken"]


def test_a_file_that_is_not_regular_is_refused(memory: GuestMemory, tmp_path: Path) -> None:
    from avmm.state import SnapshotFiles

    read_end, write_end = os.pipe()
    try:
        with pytest.raises(SnapshotError, match="not a regular file"):
            write_snapshot_files(SnapshotFiles(state_fd=write_end, memory_fd=write_end),
                                 {"machine": machine_state()}, memory, path=tmp_path / "s")
    finally:
        os.close(read_end)
        os.close(write_end)
